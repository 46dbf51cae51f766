# The steps both sbatch scripts share; sourced by colocated.sbatch and disaggregated.sbatch
# after they set ROOT (the repository). Functions only; the scripts decide the layout.
#
# Job steps (each with its own log under $LOG_DIR = $LOG_ROOT/<job id>/attempt-<restart>/):
#   gw-servers  rollout servers, SERVERS_PER_NODE tasks per rollout node     server-<node>-<task>.log
#   gw-router   sglang-router on the first rollout node                      router.log
#   gw-trainer  `groupwise train`, one task per rank (torch.distributed)     trainer.log
# The batch script's own output (sbatch --output) has the decisions: ports, requeue, exit.
#
# Preemption: TERM (from `--signal=B:TERM@<s>`, `scancel -b --signal=TERM`, or preemption) is
# forwarded to the trainer step only; the trainer finishes its step, checkpoints and exits 0.
# A trainer that stops short of trainer.steps that way (or gets TERM itself, e.g. from
# `scancel --signal=TERM <job>`) leads to `scontrol requeue`; the next attempt resumes from
# the latest checkpoint (checkpoint.resume=true is always passed). A trainer that fails is not
# requeued: it would fail again.

gw_log() { echo "[groupwise $(date +%H:%M:%S)] $*"; }
gw_die() { echo "[groupwise $(date +%H:%M:%S)] error: $1" >&2; exit "${2:-1}"; }

# Parse the environment both scripts document; the script's arguments are more overrides.
gw_setup() {
  [[ -n ${CONFIG:-} ]] || gw_die "set CONFIG to the job config (e.g. CONFIG=examples/qwen2.5-7b/grpo.yaml sbatch ...)" 2
  [[ -f $CONFIG ]] || gw_die "CONFIG=$CONFIG does not exist (relative paths are from the submit directory $PWD)" 2
  CONFIG=$(realpath "$CONFIG")
  if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
  elif [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
  else PY=python3; fi
  STEPS=("$PY" "$ROOT/slurm/steps.py")
  eval "OVR=(${OVERRIDES:-})" || gw_die "OVERRIDES is not a valid list of shell words: ${OVERRIDES}" 2
  OVR+=("$@")
  [[ -n ${MODEL_PATH:-} ]] && OVR+=("model.hf_config=$MODEL_PATH")
  OVR+=("checkpoint.resume=true")
  if [[ -n ${SOCKET_IFNAME:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}
  fi
  mapfile -t ALL_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
  STEP_GPUS=()
  (( GPUS_PER_NODE > 0 )) && STEP_GPUS=(--gpus-per-node="$GPUS_PER_NODE")
  ATTEMPT=${SLURM_RESTART_COUNT:-0}
  MAX_RESTARTS=${MAX_RESTARTS:-10}
  HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1800}
  TERM_SEEN=0
  TRAINER_PID=""
  HELPER_PIDS=()
  trap gw_on_term TERM USR1
}

# Validate the config for the trainer's world size; sets RUN_DIR, CKPT_DIR, TOTAL_STEPS, LOG_DIR.
gw_read_config() {
  local world=$1 out
  out=$("${STEPS[@]}" config --config "$CONFIG" --world "$world" "${OVR[@]}") \
    || gw_die "the config does not validate for $world trainer ranks (message above)" 2
  eval "$out"
  LOG_DIR=${LOG_ROOT:-$RUN_DIR/slurm}/$SLURM_JOB_ID/attempt-$ATTEMPT
  ADDR_DIR=$LOG_DIR/addresses
  mkdir -p "$LOG_DIR"
  gw_log "job $SLURM_JOB_ID attempt $ATTEMPT: $CONFIG on ${ALL_NODES[*]}; logs in $LOG_DIR"
}

# Servers per node for a rollout node: all its GPUs in servers of rollout.sglang.tp_size GPUs.
gw_servers_per_node() {
  if [[ -n ${SERVERS_PER_NODE:-} ]]; then echo "$SERVERS_PER_NODE"
  elif (( GPUS_PER_NODE > 0 )); then echo $(( GPUS_PER_NODE / ${CONFIG_SGLANG_TP:-$GPUS_PER_NODE} ))
  else echo 1; fi
}

# gw_start_rollout KIND LAYOUT NODELIST NNODES PER_NODE: servers + router; sets ROLLOUT_OVR,
# the trainer overrides that point it at them (rollout.engine=http, urls, router).
gw_start_rollout() {
  local kind=$1 layout=$2 nodelist=$3 nnodes=$4 per=$5 first servers router
  local count=$(( nnodes * per ))
  first=$(scontrol show hostnames "$nodelist" | head -1)
  # shellcheck disable=SC2086  # SGLANG_ARGS / ROUTER_ARGS are word lists by design
  srun --overlap --job-name=gw-servers --nodelist="$nodelist" --nodes="$nnodes" \
    --ntasks="$count" --ntasks-per-node="$per" "${STEP_GPUS[@]}" \
    --output="$LOG_DIR/server-%N-%t.log" \
    "${STEPS[@]}" server --config "$CONFIG" --dir "$ADDR_DIR" --kind "$kind" --layout "$layout" \
    "${OVR[@]}" -- ${SGLANG_ARGS:-} &
  servers=$!
  # shellcheck disable=SC2086
  srun --overlap --job-name=gw-router --nodelist="$first" --nodes=1 --ntasks=1 \
    --output="$LOG_DIR/router.log" \
    "${STEPS[@]}" router --dir "$ADDR_DIR" --count "$count" --timeout "$HEALTH_TIMEOUT" \
    -- ${ROUTER_ARGS:-} &
  router=$!
  HELPER_PIDS+=("$servers" "$router")
  gw_log "starting $count $kind server(s) on $nodelist ($per per node) and the router on $first"
  mapfile -t ROLLOUT_OVR < <("${STEPS[@]}" wait --dir "$ADDR_DIR" --count "$count" \
    --timeout "$HEALTH_TIMEOUT" --watch "$servers" "$router")
  (( ${#ROLLOUT_OVR[@]} == 3 )) || { gw_stop_helpers; gw_die "rollout servers or router did not come up; see $LOG_DIR"; }
  gw_log "rollout ready: ${ROLLOUT_OVR[*]}"
}

# gw_start_trainer NODELIST NNODES NTASKS [extra overrides...]: the trainer step, in background.
gw_start_trainer() {
  local nodelist=$1 nnodes=$2 ntasks=$3
  shift 3
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$nodelist" | head -1)}
  # The batch shell runs on the first node of the allocation, which is the trainer's first
  # node (rank 0) in both layouts, so a port free here is free where rank 0 listens.
  MASTER_PORT=${MASTER_PORT:-$("${STEPS[@]}" port)}
  export MASTER_ADDR MASTER_PORT
  gw_log "trainer: $ntasks rank(s) on $nodelist, master $MASTER_ADDR:$MASTER_PORT"
  srun --overlap --job-name=gw-trainer --nodelist="$nodelist" --nodes="$nnodes" --ntasks="$ntasks" \
    --ntasks-per-node=$(( ntasks / nnodes )) "${STEP_GPUS[@]}" --kill-on-bad-exit=1 --label \
    --output="$LOG_DIR/trainer.log" \
    env -u RANK -u WORLD_SIZE -u LOCAL_RANK \
    "$PY" -m pipeline.cli train --config "$CONFIG" "${OVR[@]}" "$@" &
  TRAINER_PID=$!
}

# Wait for the trainer step through any number of trapped signals; sets TRAINER_RC.
gw_wait_trainer() {
  while :; do
    wait "$TRAINER_PID"
    TRAINER_RC=$?
    kill -0 "$TRAINER_PID" 2>/dev/null || break
  done
  gw_log "trainer step exited with $TRAINER_RC"
}

# scancel --signal on the job's steps named $1 (srun itself would turn TERM into a kill).
gw_signal_step() {
  local ids
  ids=$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk -v n="$1" '$2 == n {print $1}')
  [[ -n $ids ]] && scancel --signal="$2" $ids
}

gw_on_term() {
  TERM_SEEN=1
  gw_log "TERM received: asking the trainer to checkpoint and stop"
  gw_signal_step gw-trainer TERM
}

gw_stop_helpers() {
  (( ${#HELPER_PIDS[@]} )) || return 0
  gw_signal_step gw-router TERM
  gw_signal_step gw-servers TERM
  local pid alive
  for _ in $(seq 30); do
    alive=0
    for pid in "${HELPER_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 1
  done
  gw_signal_step gw-router KILL
  gw_signal_step gw-servers KILL
}

# Done, requeue, or fail, from the trainer's exit code and the latest checkpoint.
gw_finish() {
  gw_stop_helpers
  local step
  step=$("${STEPS[@]}" latest-step "$CKPT_DIR") || step=0
  if (( TRAINER_RC == 0 && step >= TOTAL_STEPS )); then
    gw_log "finished: checkpoint step $step of $TOTAL_STEPS"
    exit 0
  fi
  # 0 short of the last step: the trainer checkpointed on TERM. 143 = 128 + SIGTERM: TERM came
  # before the trainer could catch it (e.g. while importing); it resumes from the last save.
  if (( TERM_SEEN || TRAINER_RC == 0 || TRAINER_RC == 143 )); then
    (( ATTEMPT < MAX_RESTARTS )) \
      || gw_die "stopped at checkpoint step $step of $TOTAL_STEPS after $ATTEMPT restarts (MAX_RESTARTS=$MAX_RESTARTS)"
    gw_log "stopped at checkpoint step $step of $TOTAL_STEPS: requeueing (restart $(( ATTEMPT + 1 )))"
    scontrol requeue "$SLURM_JOB_ID" \
      || gw_die "scontrol requeue failed (was the job submitted with --no-requeue?); resubmit to resume from step $step"
    # The requeue ends this shell; wait for it without a foreground process delaying the trap.
    sleep 300 &
    wait $!
    exit 0
  fi
  gw_die "the trainer failed with exit code $TRAINER_RC (latest checkpoint: step $step); see $LOG_DIR/trainer.log" "$TRAINER_RC"
}
