#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the sbatch scripts and for the tests in
# tests/scaleout/. Run as root (it installs packages and starts daemons).
#
#   slurm/local-cluster.sh install   apt-get install slurm-wlm + munge if missing
#   slurm/local-cluster.sh start     install, write slurm.conf, start munged, slurmctld, slurmd,
#                                    wait until the node is idle
#   slurm/local-cluster.sh stop      stop the three daemons (by their pid files)
#   slurm/local-cluster.sh status    daemons, node state, queue; exit 0 only when usable
#   slurm/local-cluster.sh restart   stop, then start
#   slurm/local-cluster.sh conf      print the slurm.conf this host gets
#
# Every command is idempotent: `start` on a running cluster only checks it, and rewrites
# slurm.conf (then restarts the Slurm daemons) only when its content would change.
#
# The node is this host with its real CPU count and memory (from `slurmd -C`; memory rounded
# down to 512 MiB so the file stays stable). Process tracking by /proc (proctrack/linuxproc)
# and no task plugin (task/none): both work without cgroups, in containers and sandboxes.
# CPUs are the consumable (CR_CPU); memory is not, so jobs are never refused for --mem.
# Completed jobs stay visible to `scontrol show job` for MinJobAge (10 minutes): there is
# no accounting database, so that is where a finished job's state and restart count live.
#
# Environment: SLURM_CONF (default /etc/slurm/slurm.conf), LOCAL_SLURM_STATE (default
# /var/spool/groupwise-slurm: state, spool, logs, pid files), LOCAL_SLURM_PORT (slurmctld
# port, default 6817; slurmd uses the next one).
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
STATE=${LOCAL_SLURM_STATE:-/var/spool/groupwise-slurm}
CTLD_PORT=${LOCAL_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$STATE/slurmctld.pid
SLURMD_PID=$STATE/slurmd.pid

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

need_root() { [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
  && command -v munged >/dev/null && command -v sbatch >/dev/null; }

cmd_install() {
  installed && return 0
  need_root
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get to install them"
  say "installing slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  installed || die "slurm-wlm installed but slurmctld/slurmd/munged/sbatch are still not on PATH"
}

# The running process named in a pid file, if any.
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

render_conf() {
  local hw node cpus boards sockets cores threads mem
  hw=$(slurmd -C | head -1)
  field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$hw"; }
  node=$(hostname -s)
  cpus=$(field CPUs); boards=$(field Boards); sockets=$(field SocketsPerBoard)
  cores=$(field CoresPerSocket); threads=$(field ThreadsPerCore); mem=$(field RealMemory)
  [[ -n $cpus && -n $mem ]] || die "could not read CPUs/RealMemory from 'slurmd -C': $hw"
  mem=$(( mem / 512 * 512 ))
  cat <<EOF
# Written by slurm/local-cluster.sh: a one-node cluster on $node. Rewritten when it changes.
ClusterName=groupwise-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmdTimeout=300
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if [[ -S $MUNGE_SOCKET ]] && munge -n </dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  # munged refuses to run as root without --force; run it as its own user, as Debian does.
  runuser -u munge -- munged --pid-file="$MUNGE_PID" || munged --force --pid-file="$MUNGE_PID"
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
  local new changed=1
  new=$(render_conf)
  if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$new" ]]; then changed=0; fi
  if (( changed )); then
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$new" >"$CONF"
    say "wrote $CONF"
  fi
  return $(( 1 - changed ))  # 0: changed
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

wait_node_idle() {
  local node state
  node=$(hostname -s)
  for _ in $(seq 120); do
    state=$(node_state)
    case $state in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*|drained*|fail*)
        scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $node is '${state:-unknown}' after 60 s; see $STATE/log/slurmd.log and slurmctld.log"
}

cmd_start() {
  cmd_install
  need_root
  mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
  start_munge
  if write_conf && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
    say "slurm.conf changed: restarting the Slurm daemons"
    stop_slurm
  fi
  if ! pid_alive "$CTLD_PID"; then
    slurmctld -f "$CONF"
  fi
  for _ in $(seq 60); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
  scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $STATE/log/slurmctld.log"
  if ! pid_alive "$SLURMD_PID"; then
    slurmd -f "$CONF"
  fi
  wait_node_idle
  say "up: node $(hostname -s), $(sinfo -h -o '%c CPUs, %m MB' | head -1), partition local"
}

stop_pidfile() {
  local file=$1 name=$2 pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }; sleep 0.1; done
  say "$name (pid $pid) did not stop on TERM; killing it"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$file"
}

stop_slurm() {
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
}

cmd_stop() {
  need_root
  stop_slurm
  stop_pidfile "$MUNGE_PID" munged
  say "stopped"
}

cmd_status() {
  local ok=0
  installed || { echo "slurm: not installed"; return 1; }
  for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
    if pid_alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
    else echo "${d%%:*}: stopped"; ok=1; fi
  done
  if (( ok == 0 )); then
    sinfo -N -o '%N %T %c %m' || ok=1
    squeue || ok=1
    case $(node_state) in idle|mixed|allocated|completing) ;; *) ok=1 ;; esac
  fi
  return $ok
}

case ${1:-} in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start ;;
  status) cmd_status ;;
  conf) cmd_install >/dev/null; render_conf ;;
  *) echo "usage: $0 install|start|stop|restart|status|conf" >&2; exit 2 ;;
esac
