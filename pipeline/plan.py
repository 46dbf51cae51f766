"""``groupwise plan``: does this config's layout fit on these nodes? Checked before an allocation.

    groupwise plan --config FILE --nodes N --gpus-per-node 8 --gpu-mem 80 [--no-colocated]
                   [--compute-capability 9.0] [dotted.key=value ...]

Runs :func:`pipeline.config.validate` at the trainer's world size (``nodes x gpus_per_node``
ranks; in the disaggregated layout count the training nodes only) for the target cluster
(``runtime=False``: FP8 is checked against ``--compute-capability``, not this machine), and a
per-GPU memory estimate for the worst pipeline stage, term by term:

    resident   parameters, gradients (fp32 DDP buffer), optimizer state (fp32 master + Adam
               moments, sharded over DP with the distributed optimizer), FP8 weight copies
    training   activations of the micro-batches in flight (1F1B / interleaved schedule,
               token-budget micro-batches, optional full recompute), logits [T, V/TP] and
               their gradient plus the fp32 scratch of the vocab-parallel log-prob path
    rollout    colocated SGLang: its weights and the KV cache of the requests in flight
               (``rollout.sglang.tp_size``; ``--max-running-requests``, ``--quantization`` and
               ``--kv-cache-dtype`` from ``rollout.sglang.extra_args``), or the embedded
               engine's copy of the model and its KV cache
    runtime    CUDA context, NCCL buffers and allocator slack (fixed + proportional)

The peak is the larger of the training and rollout phases (colocated servers release their
memory while the trainer steps, the trainer keeps its resident state while they generate).
Prints a table; exit 0 when it fits, 1 when it does not (naming the largest term and a change
that fits), 2 on a config error. :func:`estimate` is the same model as a function.

Sizes are GiB (2**30 bytes); ``--gpu-mem 80`` is an H100-80GB.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass, field

from megatron_ext.model import head_dim, padded_vocab_size
from pipeline.config import (JobConfig, algorithm_of, load_job_config, precision_mismatch,
                             rollout_fp8, sglang_arg, validate)
from pipeline.config_io import ConfigError, apply_overrides, from_dict, to_dict

GIB = float(1 << 30)
RUNTIME_FIXED_GIB = 2.0  # CUDA context + cuBLAS workspace + NCCL buffers of one trainer rank
RUNTIME_SLACK = 0.05  # allocator fragmentation, as a share of the training-phase transients
SGLANG_RUNTIME_GIB = 2.0  # a colocated SGLang rank: its context, CUDA graphs, NCCL
LOGPROB_SCRATCH_BYTES = 256 << 20  # megatron_ext.logprobs' GPU chunk scratch, per buffer


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    colocated: bool = True
    capability: tuple[int, int] = (9, 0)  # H100/H200

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama/Qwen2/Qwen3 dense model, read from its HF config."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf) -> "Shape":
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(layers=hf.num_hidden_layers, hidden=hf.hidden_size, ffn=hf.intermediate_size,
                   heads=hf.num_attention_heads,
                   groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                   head_dim=head_dim(hf), vocab=hf.vocab_size,
                   tied=bool(getattr(hf, "tie_word_embeddings", False)),
                   qkv_bias=hf.model_type == "qwen2" or attention_bias,
                   o_bias=hf.model_type == "llama" and attention_bias,
                   mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=hf.model_type == "qwen3")

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.groups * self.head_dim

    def linear_params(self, tp: int = 1) -> float:
        """Weights of one layer's GEMMs on one TP rank (QKV, proj, fc1 gate+up, fc2)."""
        h, f = self.hidden, self.ffn
        return (h * (self.q_width + 2 * self.kv_width) + self.q_width * h + 3 * h * f) / tp

    def layer_params(self, tp: int = 1) -> float:
        """One decoder layer on one TP rank: GEMMs, their biases, the replicated norms."""
        n = self.linear_params(tp) + 2 * self.hidden
        if self.qkv_bias:
            n += (self.q_width + 2 * self.kv_width) / tp
        if self.o_bias:
            n += self.hidden
        if self.mlp_bias:
            n += 2 * self.ffn / tp + self.hidden
        if self.qk_norm:
            n += 2 * self.head_dim
        return n


def param_count(hf) -> int:
    """Parameters of the HF model (unpadded vocabulary): embedding, layers, final norm, head."""
    s = Shape.from_hf(hf)
    return int(s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * s.layer_params() + s.hidden)


@dataclass
class Term:
    name: str
    gib: float
    phase: str  # resident | training | rollout
    note: str = ""


@dataclass
class Plan:
    """The estimate for the worst stage. ``problems`` fail the plan; ``warnings`` do not."""

    hw: Hardware
    summary: list[str]
    terms: list[Term]
    stage: int
    stages: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def phase_gib(self, phase: str) -> float:
        include = {"resident", phase, "runtime"}
        return sum(t.gib for t in self.terms if t.phase in include or t.phase == f"runtime:{phase}")

    @property
    def peak_gib(self) -> float:
        return max(self.phase_gib("training"), self.phase_gib("rollout"))

    @property
    def peak_phase(self) -> str:
        return "training" if self.phase_gib("training") >= self.phase_gib("rollout") else "rollout"

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak_gib <= self.hw.gpu_mem_gib

    def largest(self) -> Term:
        phase = self.peak_phase
        return max((t for t in self.terms if t.phase in ("resident", phase)), key=lambda t: t.gib)

    def term(self, name: str) -> float:
        return sum(t.gib for t in self.terms if t.name == name)


# ---------------------------------------------------------------------------------- estimate


def estimate(cfg: JobConfig, hw: Hardware) -> Plan:
    """The memory plan of ``cfg`` on ``hw`` (raises ConfigError when ``validate`` does)."""
    from megatron_ext.model import load_hf_config

    derived = validate(cfg, hw.world, runtime=False, capability=hw.capability)
    hf = load_hf_config(cfg.model.hf_config)
    s = Shape.from_hf(hf)
    par, m, opt, r, tr = cfg.parallel, cfg.model, cfg.optimizer, cfg.rollout, cfg.trainer
    tp, pp, cp, vpp = par.tensor_parallel, par.pipeline_parallel, par.context_parallel, par.virtual_pipeline or 1
    dp = derived["dp"]
    vocab_p = padded_vocab_size(s.vocab, tp, m.make_vocab_size_divisible_by)
    algo = algorithm_of(cfg)
    problems, warnings = [], []
    bf16 = m.params_dtype == "bf16"
    pbytes = 2 if bf16 else 4

    # Rows of one optimizer step on one DP rank, all at the longest possible length.
    keep = algo.config.downsample.keep if algo.config.downsample is not None else r.n_samples
    rows = r.prompts_per_step // dp // tr.updates_per_step * keep
    row_len = cfg.data.max_prompt_tokens + r.max_new_tokens
    mb_tokens = max(tr.micro_batch_tokens, row_len)
    rows_per_mb = max(1, tr.micro_batch_tokens // row_len)
    n_mb = math.ceil(rows / rows_per_mb)
    if tr.micro_batch_tokens < row_len:
        warnings.append(f"trainer.micro_batch_tokens={tr.micro_batch_tokens} < the longest row "
                        f"({row_len} = data.max_prompt_tokens + rollout.max_new_tokens): such a row "
                        f"gets a micro-batch of its own, and activations are planned for {row_len}")
    if pp > 1 and n_mb < pp:
        warnings.append(f"{n_mb} micro-batches per update < parallel.pipeline_parallel={pp}: "
                        f"the pipeline idles; raise the batch or lower trainer.micro_batch_tokens")

    layers_stage = s.layers // pp
    stages = {0: "first"} if pp == 1 else {0: "first", pp - 1: "last"}
    worst = None
    for stage in stages:
        first, last = stage == 0, stage == pp - 1
        params = layers_stage * s.layer_params(tp)
        linear = layers_stage * s.linear_params(tp)
        if first:
            params += vocab_p * s.hidden / tp
        if last:
            params += s.hidden
            if not s.tied or pp > 1:
                params += vocab_p * s.hidden / tp
        terms = _resident_terms(params, linear, pbytes, bf16, dp * cp, opt.use_distributed_optimizer, m.fp8)
        act = _activation_bytes(s, cfg, mb_tokens, n_mb, stage, layers_stage, tp, pp, vpp, cp)
        terms.append(Term("activations", act / GIB, "training", _act_note(m, par, n_mb, stage, pp, vpp)))
        logits = 0.0
        if last:
            cols = vocab_p / tp
            chunk = tr.logprob_chunk_tokens or max(1, LOGPROB_SCRATCH_BYTES // int(4 * cols))
            local = mb_tokens / cp  # each CP rank holds its share of every sequence
            scratch = 2 * min(chunk, local) * cols * 4  # two fp32 [chunk, V/TP] buffers
            logits = local * cols * pbytes * 2 + scratch
            terms.append(Term("logits + log-prob scratch", logits / GIB, "training",
                              f"[{mb_tokens}/{cp}, {vocab_p}/{tp}] logits and grad, fp32 chunks"))
        terms += _rollout_terms(cfg, hw, s, algo.name, problems)
        slack = RUNTIME_SLACK * (act + logits) / GIB
        terms.append(Term("runtime (CUDA, NCCL, allocator)", RUNTIME_FIXED_GIB + slack, "runtime"))
        peak = Plan(hw=hw, summary=[], terms=terms, stage=stage, stages=pp).peak_gib
        if worst is None or peak > worst[0]:
            worst = (peak, stage, terms)
    _, stage, terms = worst
    summary = [
        f"layout   {hw.nodes} node(s) x {hw.gpus_per_node} GPUs ({hw.gpu_mem_gib:g} GiB), "
        f"TP={tp} PP={pp}{f' VPP={vpp}' if vpp > 1 else ''} CP={cp} DP={dp}"
        f"{', sequence parallel' if par.sequence_parallel else ''}"
        f"{', distributed optimizer' if opt.use_distributed_optimizer else ''}, "
        f"{'colocated' if hw.colocated else 'disaggregated'} rollout ({r.engine})",
        f"model    {hf.model_type} {_count(param_count(hf))} parameters, vocab {s.vocab} "
        f"padded to {vocab_p}, {m.params_dtype}{f', fp8 {m.fp8}/{m.fp8_recipe}' if m.fp8 else ''}"
        f", recompute {m.recompute_granularity or 'none'}",
        f"checks   heads {s.heads}, query groups {s.groups}, ffn {s.ffn} divisible by TP {tp}; "
        f"layers {s.layers} by PP x VPP {pp * vpp}; vocab padded to {vocab_p // tp} rows per TP "
        f"rank; {r.prompts_per_step} prompts by DP {dp} ({r.prompts_per_step // dp} per rank, "
        f"{tr.updates_per_step} update(s)): ok",
        f"batch    {r.prompts_per_step} prompts x {r.n_samples} samples ({keep} trained), "
        f"rows <= {row_len} tokens, micro-batch {tr.micro_batch_tokens} tokens, "
        f"{n_mb} micro-batches per update per DP rank",
    ]
    if m.recompute_granularity == "selective":
        warnings.append("model.recompute_granularity=selective recomputes core attention only; "
                        "with flash/SDPA attention there is no score matrix to save, so it saves "
                        "no memory here (use full)")
    return Plan(hw=hw, summary=summary, terms=terms, stage=stage, stages=pp, problems=problems,
                warnings=warnings + _precision_warnings(cfg, algo))


def _resident_terms(params, linear, pbytes, bf16, dp, distributed, fp8) -> list[Term]:
    # Megatron keeps a bf16 model copy, an fp32 grad buffer (grad_reduce_in_fp32) and, for bf16
    # params, fp32 master weights next to Adam's two fp32 moments: 2 + 4 + 12 bytes per param,
    # the 12 divided over DP by the distributed optimizer (fp32 params: 4 + 4 + 8).
    opt_bytes = 12 if bf16 else 8
    shard = dp if distributed else 1
    terms = [
        Term("parameters", params * pbytes / GIB, "resident", f"{_count(params)} on this rank"),
        Term("gradients", params * 4 / GIB, "resident", "fp32 DDP buffer"),
        Term("optimizer state", params * opt_bytes / shard / GIB, "resident",
             f"{'fp32 master + ' if bf16 else ''}Adam m, v" + (f" / DP {dp}" if shard > 1 else "")),
    ]
    if fp8:
        # TE keeps an FP8 copy of each GEMM weight and its transpose across micro-batches.
        terms.append(Term("fp8 weight copies", linear * 2 / GIB, "resident", "weight + transpose"))
    return terms


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _layer_act_elems(s: Shape, tp: int, sp: bool, fp8: bool) -> float:
    """Bytes one layer saves for backward per token (Korthikanti et al. 2022, Sec. 4, for a
    GQA + SwiGLU layer with flash attention and no dropout): norm inputs, GEMM inputs, q/k/v,
    attention output, fc1 output. With SP everything is split over TP; without, the h-sized
    tensors are replicated on every TP rank. FP8 stores the GEMM inputs in one byte."""
    h, f, q, kv = s.hidden, s.ffn, s.q_width, s.kv_width
    rep = 1 if sp else tp  # h-sized tensors are sharded only with sequence parallelism
    norm_in = 2 * h * 2 * rep / tp  # input_layernorm and pre_mlp_layernorm inputs, bf16
    gemm_in_h = 2 * h * (1 if fp8 else 2) * rep / tp  # QKV and fc1 inputs
    qkv = (q + 2 * kv) * 2 / tp + (q + kv) * 2 / tp * s.qk_norm
    attn_out = q * 2 / tp + (q / tp if fp8 else 0)  # flash output; FP8 keeps its own copy for proj
    fc1_out = 2 * f * 2 / tp
    fc2_in = f * (1 if fp8 else 2) / tp
    return norm_in + gemm_in_h + qkv + attn_out + fc1_out + fc2_in


def _activation_bytes(s, cfg, mb_tokens, n_mb, stage, layers_stage, tp, pp, vpp, cp) -> float:
    m, sp = cfg.model, cfg.parallel.sequence_parallel
    tokens = mb_tokens / cp
    per_layer = _layer_act_elems(s, tp, sp, m.fp8 is not None) * tokens
    if pp == 1:
        in_flight_layers = layers_stage
    elif vpp == 1:  # 1F1B: stage i holds pp - i micro-batches during warm-up
        in_flight_layers = min(pp - stage, n_mb) * layers_stage
    else:  # interleaved: megatron's warm-up count for the first rank, in model chunks
        chunks = min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, n_mb * vpp)
        in_flight_layers = chunks * layers_stage / vpp
    if m.recompute_granularity == "full":
        group = max(1, m.recompute_num_layers)
        layer_input = tokens * s.hidden * 2 / (tp if sp else 1)
        # checkpointed inputs of every group in flight + one group rematerialised in backward
        return in_flight_layers / group * layer_input + group * per_layer
    # the last stage's final norm and output-layer inputs ride along with its micro-batch
    extra = 2 * tokens * s.hidden * 2 / (tp if sp else 1) if stage == pp - 1 else 0
    return in_flight_layers * per_layer + extra


def _act_note(m, par, n_mb, stage, pp, vpp) -> str:
    sched = "no pipeline" if pp == 1 else (f"1F1B, {min(pp - stage, n_mb)} micro-batches in flight"
                                           if vpp == 1 else f"interleaved x{vpp}")
    rec = f"full recompute /{m.recompute_num_layers}" if m.recompute_granularity == "full" else "no recompute"
    return f"{sched}, {rec}{', SP' if par.sequence_parallel else ''}"


def _sglang_settings(cfg: JobConfig, hw: Hardware) -> dict:
    """SGLang's tensor parallelism (``rollout.sglang.tp_size``, default: a node) and the
    options that size its memory."""
    tp = int(cfg.rollout.sglang.get("tp_size") or hw.gpus_per_node)
    running = sglang_arg(cfg, "max_running_requests")
    return dict(tp=tp, kv_dtype=sglang_arg(cfg, "kv_cache_dtype") or "auto",
                max_running=int(running) if running else None)


def _rollout_terms(cfg: JobConfig, hw: Hardware, s: Shape, algo: str, problems: list) -> list[Term]:
    """Colocated rollout memory on one GPU: the engine's weights and the KV cache of the
    requests it runs at once, every request at its longest (prompt + max_new_tokens)."""
    r = cfg.rollout
    if not hw.colocated:
        return []
    ctx = cfg.data.max_prompt_tokens + r.max_new_tokens
    rows = r.prompts_per_step * r.n_samples
    count = s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * s.layer_params()
    copies = 2 if algo == "aapo" else 1  # AAPO samples its reference from a frozen second engine
    if r.engine == "embedded":
        wbytes = 2 if cfg.model.params_dtype == "bf16" else 4
        kv = 2 * s.layers * s.kv_width * wbytes * min(rows, r.batch_size) * ctx
        return [Term("engine weights", copies * count * wbytes / GIB, "rollout", "embedded engine, full copy"),
                Term("engine KV cache", copies * kv / GIB, "rollout", f"{min(rows, r.batch_size)} rows x {ctx}")]
    sg = _sglang_settings(cfg, hw)
    tp = sg["tp"]
    if hw.gpus_per_node % tp or s.heads % tp:
        problems.append(f"rollout.sglang.tp_size={tp} must divide the GPUs per node "
                        f"({hw.gpus_per_node}) and num_attention_heads ({s.heads})")
        return []
    replicas = hw.world // tp
    per_replica = math.ceil(rows / replicas)
    running = min(per_replica, int(sg["max_running"])) if sg["max_running"] else per_replica
    fp8_weights = rollout_fp8(cfg)
    embed = s.vocab * s.hidden * (1 if s.tied else 2)
    weights = (embed * 2 + (count - embed) * (1 if fp8_weights else 2)) / tp
    kv_bytes = 1 if sg["kv_dtype"].startswith("fp8") else 2
    kv_heads = max(1, s.groups // tp)  # SGLang replicates KV heads when TP exceeds them
    kv = 2 * s.layers * kv_heads * s.head_dim * kv_bytes * running * ctx
    return [
        Term("sglang weights", copies * weights / GIB, "rollout",
             f"tp {tp}{', fp8' if fp8_weights else ''}"),
        Term("sglang KV cache", copies * kv / GIB, "rollout",
             f"{running} of {per_replica} requests x {ctx} tokens{', fp8' if kv_bytes == 1 else ''}"),
        Term("sglang runtime", copies * SGLANG_RUNTIME_GIB, "runtime:rollout", "context, CUDA graphs"),
    ]


def _precision_warnings(cfg: JobConfig, algo) -> list[str]:
    """TIS is on by default when the precisions differ (:func:`pipeline.config.algorithm_of`);
    warn only when the config turned it off."""
    reason = precision_mismatch(cfg)
    if reason is None or algo.config.tis is not None:
        return []
    return [f"{reason}, and algorithm.tis: null turns off the correction of that engine/trainer "
            "mismatch; remove it (TIS truncate is the default then)"]


# ------------------------------------------------------------------------------- remedies


def _candidates(cfg: JobConfig, hw: Hardware, largest: str) -> list[tuple[str, list[str], Hardware]]:
    """Single changes that shrink memory, those aimed at the largest term first."""
    par, m, opt, tr = cfg.parallel, cfg.model, cfg.optimizer, cfg.trainer
    row_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    out: dict[str, list] = {"activations": [], "logits": [], "state": [], "rollout": [], "any": []}
    if m.recompute_granularity != "full":
        out["activations"].append(("model.recompute_granularity=full", ["model.recompute_granularity=full"], hw))
    budget = tr.micro_batch_tokens // 2
    while budget >= max(row_len, 1024):
        o = f"trainer.micro_batch_tokens={budget}"
        out["activations"].append((o, [o], hw))
        out["logits"].append((o, [o], hw))
        budget //= 2
    if not opt.use_distributed_optimizer:
        o = "optimizer.use_distributed_optimizer=true"
        out["state"].append((o, [o], hw))
    if par.tensor_parallel > 1 and not par.sequence_parallel:
        o = "parallel.sequence_parallel=true"
        out["activations"].append((o, [o], hw))
    tp = par.tensor_parallel * 2
    if tp <= hw.gpus_per_node:
        o = [f"parallel.tensor_parallel={tp}", "parallel.sequence_parallel=true"]
        for k in ("state", "logits", "activations"):
            out[k].append((" ".join(o), o, hw))
    for pp in (par.pipeline_parallel * 2, par.pipeline_parallel * 4):
        o = [f"parallel.pipeline_parallel={pp}"]
        out["state"].append((o[0], o, hw))
    running = _sglang_settings(cfg, hw)["max_running"]
    others = _without_arg(cfg.rollout.sglang.get("extra_args") or [], "--max-running-requests")
    for cap in (256, 128, 64, 32):
        if running is None or cap < running:
            o = f"rollout.sglang.extra_args={json.dumps(others + ['--max-running-requests', str(cap)])}"
            out["rollout"].append((f"SGLang --max-running-requests {cap}", [o], hw))
    if hw.colocated:
        out["rollout"].append(("--no-colocated (rollout on separate nodes)", [],
                               Hardware(hw.nodes, hw.gpus_per_node, hw.gpu_mem_gib, False, hw.capability)))
    for n in (hw.nodes * 2, hw.nodes * 4):
        out["any"].append((f"--nodes {n}", [], Hardware(n, hw.gpus_per_node, hw.gpu_mem_gib,
                                                        hw.colocated, hw.capability)))
    key = ("activations" if largest == "activations" else "logits" if largest.startswith("logits")
           else "rollout" if largest.startswith(("sglang", "engine")) else "state")
    order = [key] + [k for k in ("activations", "state", "logits", "rollout", "any") if k != key]
    return [c for k in order for c in out[k]]


def _without_arg(args: list, flag: str) -> list[str]:
    out, skip = [], False
    for a in map(str, args):
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def suggest(cfg: JobConfig, hw: Hardware, plan: Plan) -> str | None:
    """The first single change (then pair of changes) under which the plan fits."""
    cands = _candidates(cfg, hw, plan.largest().name)
    for desc, overrides, hw2 in cands:
        fitted = _try(cfg, overrides, hw2)
        if fitted is not None:
            return f"{desc} (peak {fitted.peak_gib:.1f} GiB)"
    for i, (d1, o1, h1) in enumerate(cands):
        for d2, o2, h2 in cands[i + 1:]:
            if h1 is not hw and h2 is not hw:
                continue
            fitted = _try(cfg, o1 + o2, h2 if h1 is hw else h1)
            if fitted is not None:
                return f"{d1} and {d2} (peak {fitted.peak_gib:.1f} GiB)"
    return None


def _try(cfg: JobConfig, overrides: list[str], hw: Hardware) -> Plan | None:
    try:
        data = apply_overrides(copy.deepcopy(to_dict(cfg)), overrides)
        p = estimate(from_dict(JobConfig, data, ""), hw)
    except ConfigError:
        return None
    return p if p.fits else None


# ------------------------------------------------------------------------------------ CLI


def render(plan: Plan, config_path: str = "") -> str:
    hw = plan.hw
    lines = [f"groupwise plan {config_path}".rstrip(), *plan.summary, ""]
    lines.append(f"{'memory per GPU (pipeline stage ' + str(plan.stage) + ' of ' + str(plan.stages) + ')':<36}"
                 f"{'GiB':>12}  phase")
    for t in plan.terms:
        lines.append(f"  {t.name:<34}{t.gib:>12.2f}  {t.phase.split(':')[0]:<9} {t.note}")
    lines.append(f"  {'training phase total':<34}{plan.phase_gib('training'):>12.2f}")
    if any(t.phase in ("rollout", "runtime:rollout") for t in plan.terms):
        lines.append(f"  {'rollout phase total':<34}{plan.phase_gib('rollout'):>12.2f}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'peak (' + plan.peak_phase + ')':<34}{plan.peak_gib:>12.2f}  of {hw.gpu_mem_gib:g}: {verdict}")
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    for p in plan.problems:
        lines.append(f"error: {p}")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="groupwise plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, required=True, help="training nodes")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (80: H100-80GB)")
    ap.add_argument("--colocated", action=argparse.BooleanOptionalAction, default=None,
                    help="rollout servers share the training GPUs (default: unless rollout.engine=http)")
    ap.add_argument("--compute-capability", default="9.0", help="target GPU, e.g. 9.0 (Hopper), 10.0")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        major, minor = (int(x) for x in args.compute_capability.split("."))
    except ValueError:
        print(f"plan: --compute-capability {args.compute_capability!r}: expected MAJOR.MINOR", file=sys.stderr)
        return 2
    if args.nodes < 1 or args.gpus_per_node < 1 or args.gpu_mem <= 0:
        print("plan: --nodes, --gpus-per-node and --gpu-mem must be positive", file=sys.stderr)
        return 2
    try:
        cfg = load_job_config(args.config, list(args.overrides))
        colocated = args.colocated if args.colocated is not None else cfg.rollout.engine != "http"
        hw = Hardware(args.nodes, args.gpus_per_node, args.gpu_mem, colocated, (major, minor))
        plan = estimate(cfg, hw)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(render(plan, args.config))
    if plan.problems:
        return 2
    if plan.fits:
        return 0
    big = plan.largest()
    fix = suggest(cfg, hw, plan)
    print(f"does not fit: the {plan.peak_phase} phase needs {plan.peak_gib:.1f} GiB of "
          f"{hw.gpu_mem_gib:g}; the largest term is {big.name} ({big.gib:.1f} GiB)")
    print(f"a change that fits: {fix}" if fix else
          "no single change or pair of changes tried fits; add nodes or shorten sequences")
    return 1


if __name__ == "__main__":
    sys.exit(main())
