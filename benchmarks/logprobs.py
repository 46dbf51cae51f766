"""Benchmark: vocab-parallel log-probs + entropy, forward and backward, against two baselines.

    python benchmarks/logprobs.py                      # T=4096, V=152064, TP=1 and TP=2, bf16
    python benchmarks/logprobs.py --tokens 1024 --tp 2 # smaller / one layout

Variants, each computing per-token log-prob of the target AND entropy, then backward of
``sum(w1 * logp) + sum(w2 * entropy)``:

- ``ours``: :func:`megatron_ext.logprobs.vocab_parallel_logprobs_entropy`.
- ``(a) gather``: megatron's ``gather_from_tensor_model_parallel_region`` (all-gather the
  vocabulary; backward splits) then ``log_softmax`` of the fp32 full-vocabulary logits, entropy
  as ``-(exp(lp) * lp).sum()``, plain autograd.
- ``(b) megatron CE + entropy``: megatron-core's ``vocab_parallel_cross_entropy`` for the
  log-prob, plus a separate vocab-parallel entropy written the way RL frameworks commonly do
  it (all-reduced max / sum-exp / sum p*z, fp32 logits and softmax kept for backward).

How memory is measured (CPU): every (variant, TP) pair runs in freshly spawned processes, one
per TP rank, each with one thread. After the inputs (logits shard, targets, weights) exist,
the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``)
and ``VmRSS`` is read; one forward+backward runs, keeping the gradient of the logits like a
training step would; then ``VmHWM - VmRSS_before`` is the peak extra resident memory. That is
what the operating system had to provide, allocator slack and collective buffers included,
so it is honest and slightly pessimistic for everyone. The figure reported for TP=2 is the
larger of the two ranks. Time: median over ``--repeats`` further runs of the slowest rank,
ranks started together by a barrier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from megatron_ext.multirank import run_ranks

VARIANTS = ("ours", "(a) gather", "(b) megatron CE + entropy")


class _EntropyKeepingSoftmax(torch.autograd.Function):
    """Baseline entropy, logits sharded on the last dim over ``group``; returns [T] fp32.
    Keeps the fp32 logits and the fp32 softmax of the shard for backward, as RL frameworks
    commonly do; three all-reduces of [T] (max, sum-exp, sum p*z)."""

    @staticmethod
    def forward(ctx, logits, group):
        z = logits.float()
        m = z.amax(dim=-1)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        p = z.exp()
        s = p.sum(dim=-1)
        dist.all_reduce(s, group=group)
        p.div_(s.unsqueeze(-1))
        pz = (p * z).sum(dim=-1)
        dist.all_reduce(pz, group=group)
        ctx.save_for_backward(z, p, pz)
        ctx.dtype = logits.dtype
        return s.log() - pz

    @staticmethod
    def backward(ctx, grad):
        z, p, pz = ctx.saved_tensors
        # dH/dz_j = -p_j (z_j - sum_i p_i z_i), computed in place in the saved softmax
        z.sub_(pz.unsqueeze(-1))
        p.mul_(z).mul_(-grad.unsqueeze(-1))
        return p.to(ctx.dtype), None


def _variant_fn(name, tp_group):
    from megatron.core.tensor_parallel import (gather_from_tensor_model_parallel_region,
                                               vocab_parallel_cross_entropy)

    from megatron_ext.logprobs import vocab_parallel_logprobs_entropy

    def ours(x, y):
        return vocab_parallel_logprobs_entropy(x, y, tp_group=tp_group)

    def gather(x, y):
        lp = torch.log_softmax(gather_from_tensor_model_parallel_region(x).float(), dim=-1)
        return lp.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)

    def megatron_ce(x, y):
        # megatron's CE subtracts the max in place from what `.float()` returns: for fp32
        # input that is the caller's tensor, so it gets a clone there (bf16 needs none).
        ce_in = x.clone() if x.dtype == torch.float32 else x
        entropy = _EntropyKeepingSoftmax.apply(x, tp_group)
        return -vocab_parallel_cross_entropy(ce_in, y), entropy

    return {"ours": ours, "(a) gather": gather, "(b) megatron CE + entropy": megatron_ce}[name]


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # only fresh processes are used, so the HWM is still meaningful
        print(f"warning: cannot reset VmHWM ({e}); peak includes start-up", file=sys.stderr)


def _measure(rank, world_size, name, tokens, vocab, dtype, repeats, seed):
    """One variant on this rank: peak extra RSS of one fwd+bwd, then timed repeats."""
    from megatron_ext import cpu_compat

    cpu_compat.enable()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()
    fn = _variant_fn(name, group)

    shard = vocab // world_size
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (tokens,), generator=g)  # same seed: replicated
    w1, w2 = torch.randn(tokens, generator=g), torch.randn(tokens, generator=g)
    g.manual_seed(seed + 1 + rank)  # each rank its own shard of one fixed full matrix
    logits = (torch.randn(tokens, shard, generator=g) * 2).to(dtype).requires_grad_()

    def step():
        logp, entropy = fn(logits, targets)
        t_fwd = time.perf_counter()
        ((logp * w1).sum() + (entropy * w2).sum()).backward()
        return logp.detach(), entropy.detach(), t_fwd

    dist.barrier()
    _reset_peak_rss()
    before = _rss_bytes("VmRSS")
    logp, entropy, _ = step()
    peak_extra = _rss_bytes("VmHWM") - before
    grad_rows = logits.grad[:4].float().clone()
    logits.grad = None

    fwd, bwd = [], []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        _, _, t1 = step()
        t2 = time.perf_counter()
        logits.grad = None
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return dict(peak_extra=peak_extra, fwd=fwd, bwd=bwd, logp=logp, entropy=entropy,
                grad_rows=grad_rows)


# Peak extra bytes per full-vocabulary element per rank of baseline (a), measured here at
# T=256 (bf16 logits): the gathered logits, their fp32 copy, log_softmax, exp and the grads.
_GATHER_BYTES_PER_ELEMENT = 20


def _check_fits(tp, args):
    """Refuse a layout whose baseline (a) would not fit in RAM: every rank gathers [T, V]."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    need = _GATHER_BYTES_PER_ELEMENT * args.tokens * args.vocab * tp
    if need > 0.85 * available:
        fit = int(0.85 * available / (_GATHER_BYTES_PER_ELEMENT * args.vocab * tp))
        raise SystemExit(f"TP={tp}: baseline (a) needs about {need / 2**30:.1f} GiB "
                         f"({tp} ranks each holding the gathered [T, V] in fp32 several times) "
                         f"but {available / 2**30:.1f} GiB are available; run this layout "
                         f"with --tokens {fit} or fewer")


def run_layout(tp, args, dtype):
    rows = {}
    for name in VARIANTS:
        per_rank = run_ranks(_measure, tp, name, args.tokens, args.vocab, dtype, args.repeats,
                             args.seed, timeout=3600)
        total = [max(r["fwd"][i] + r["bwd"][i] for r in per_rank) for i in range(args.repeats)]
        rows[name] = dict(
            peak_extra=max(r["peak_extra"] for r in per_rank),
            fwd=statistics.median(max(r["fwd"][i] for r in per_rank) for i in range(args.repeats)),
            bwd=statistics.median(max(r["bwd"][i] for r in per_rank) for i in range(args.repeats)),
            total=statistics.median(total),
            logp=per_rank[0]["logp"], entropy=per_rank[0]["entropy"],
            grad_rows=torch.cat([r["grad_rows"] for r in per_rank], dim=-1))
        print(f"  ran {name:28s} peak extra {rows[name]['peak_extra'] / 2**20:9.0f} MiB, "
              f"fwd+bwd {rows[name]['total']:.3f} s", flush=True)
    return rows


def report(tp, rows, args):
    ours, a, b = (rows[n] for n in VARIANTS)
    print(f"\nTP={tp}  T={args.tokens}  V={args.vocab}  {args.dtype}  "
          f"(shard [T, {args.vocab // tp}] per rank)")
    print(f"  {'variant':28s} {'peak extra MiB':>14s} {'fwd s':>8s} {'bwd s':>8s} {'total s':>8s}")
    for name in VARIANTS:
        r = rows[name]
        print(f"  {name:28s} {r['peak_extra'] / 2**20:14.0f} {r['fwd']:8.3f} {r['bwd']:8.3f} "
              f"{r['total']:8.3f}")
    for name in VARIANTS[1:]:
        r = rows[name]
        print(f"  vs {name}: max|dlogp| {(r['logp'] - ours['logp']).abs().max():.2e}, "
              f"max|dH| {(r['entropy'] - ours['entropy']).abs().max():.2e}, "
              f"max|dgrad| {(r['grad_rows'] - ours['grad_rows']).abs().max():.2e}")
    mem_ratio = ours["peak_extra"] / a["peak_extra"]
    time_ratio = ours["total"] / b["total"]
    print(f"  memory ours / (a) = {mem_ratio:.3f}  (goal <= 0.25: "
          f"{'met' if mem_ratio <= 0.25 else 'NOT met'})")
    print(f"  memory ours / (b) = {ours['peak_extra'] / b['peak_extra']:.3f}")
    print(f"  time   ours / (b) = {time_ratio:.3f}  (goal <= 1: "
          f"{'met' if time_ratio <= 1 else 'NOT met'})")
    print(f"  time   ours / (a) = {ours['total'] / a['total']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="logits dtype (bf16: what a bf16 Megatron output layer produces)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for tp in args.tp:
        if args.vocab % tp:
            p.error(f"--vocab {args.vocab} must be divisible by every --tp, not {tp}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, one thread per rank; "
          f"peak extra = VmHWM - VmRSS around one fwd+bwd in a fresh process per variant")
    for tp in args.tp:
        _check_fits(tp, args)
    for tp in args.tp:
        print(f"\nTP={tp}:", flush=True)
        report(tp, run_layout(tp, args, dtype), args)


if __name__ == "__main__":
    main()
