"""Per-token log-probs and entropy from vocab-parallel logits, without a full-vocabulary softmax.

The RL losses need, for every token t with logits row ``x_t`` and sampled token ``y_t``::

    z     = x.float() / temperature          (exactly what the rollout engine samples from)
    lse_t = log sum_j exp(z_tj)
    logp_t = z_t,y_t - lse_t                 (log-prob of the sampled token)
    H_t    = lse_t - sum_j p_tj z_tj         (entropy of p_t = softmax(z_t))

Megatron keeps ``x`` split over tensor-parallel ranks on the vocabulary dimension. Every
quantity above is a per-token reduction over the vocabulary, so each rank reduces its own
shard and the shards are combined with all-reduces of ``[T]`` vectors: nothing of vocabulary
size ever crosses the wire, and no rank ever holds a full ``[T, V]`` tensor.

Memory: the forward walks the tokens in chunks of ``chunk_size`` rows through two reusable
fp32 scratch buffers of ``[chunk_size, V/TP]``, and keeps for backward only the input logits
(a reference, not a copy; for bf16 logits that is half the bytes of the fp32 softmax other
implementations keep) plus three fp32 ``[T]`` statistics: the global max ``m``, ``log S`` with
``S = sum_j exp(z_j - m)`` (so ``lse = m + log S``), and ``H``. The backward recomputes the
softmax chunk by chunk from those. A full-size fp32 softmax, the usual out-of-memory of
RL frameworks at 128k-152k vocabularies, is never materialised; the only full-size tensor
created is the gradient itself, in the logits' dtype.

Gradient (derivation, per token, dropping t): with ``p_j = exp(z_j - lse)``,

    d lse / d z_j  = p_j
    d logp / d z_j = [j = y] - p_j
    d (sum_i p_i z_i) / d z_j = p_j + sum_i z_i p_i ([i = j] - p_j) = p_j (1 + z_j - sum_i p_i z_i)
    d H / d z_j    = p_j - p_j (1 + z_j - sum_i p_i z_i) = -p_j (z_j - sum_i p_i z_i)
                   = -p_j (log p_j + H)           since sum_i p_i z_i = lse - H

so for upstream gradients ``g`` (of logp) and ``h`` (of H)::

    dL/dz_j = g [j = y] - p_j (g + h (log p_j + H)),      dL/dx_j = dL/dz_j / temperature.

Each term needs only the local ``z_j`` and the already-reduced per-token ``m``, ``log S`` and
``H``; the backward evaluates it as ``exp(z_j - m) (a + b (z_j - m)) + [j = y] g / temperature``
with per-token constants ``a`` and ``b`` folded from ``g``, ``h``, ``H`` and ``S``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# Rows per chunk when the caller gives none: two fp32 scratch buffers of this many bytes each.
# On CPU a small block keeps the ~8 element-wise passes of a chunk inside the L2 cache; on a
# GPU larger blocks amortise kernel launches while staying far below the [T, V] softmax.
_CPU_CHUNK_BYTES = 2 << 20
_GPU_CHUNK_BYTES = 256 << 20


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V/TP] sharded on the last dim over ``tp_group``; targets [...] global vocab
    ids, replicated over TP; returns (logprobs [...], entropy [...]) fp32, replicated over TP.

    Leading dimensions are flattened into one token dimension T (pass contiguous logits: a
    non-contiguous tensor is copied once and that copy is what backward keeps).

    Args:
        logits: bf16, fp16 or fp32. Group rank ``r`` holds global columns
            ``[r * V/TP, (r + 1) * V/TP)``, Megatron's vocab-parallel layout. Must be finite.
        targets: integer ids in ``[0, vocab_size)``. Positions that carry no loss still need a
            valid id (e.g. 0); weight them out in the loss.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` or a group
            of size 1 means ``logits`` hold the whole vocabulary.
        temperature: the sampling temperature; logits are divided by it in fp32
            (``logits.float() / temperature``) exactly as the rollout engine does, so trainer
            and engine log-probs of the same weights agree.
        chunk_size: tokens per chunk (default: sized from a scratch-memory budget). Any
            positive value gives the same result up to fp32 rounding.
        vocab_size: the true vocabulary size when the last shards carry padding columns
            (Megatron pads the vocabulary to a multiple of 128 * TP). Columns at or beyond it
            are treated as logits of -inf: they get probability 0 and gradient 0.

    Both outputs are differentiable; the gradient of ``logits`` has the logits' dtype and is
    zero on padding columns. The upstream gradients must be identical on every TP rank, which
    holds when the loss is computed redundantly on each of them (as Megatron does).
    """
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension, got a scalar")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal the logits shape "
                         f"without its vocabulary dimension, {tuple(logits.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids, got {targets.dtype}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    padded_vocab = logits.shape[-1] * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    elif not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded_vocab}]: the logits "
                         f"cover {logits.shape[-1]} columns on each of {tp_size} TP ranks")
    if targets.numel() and bool(((targets < 0) | (targets >= vocab_size)).any()):
        raise ValueError(f"targets must be token ids in [0, {vocab_size}); got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    logp, entropy = _LogprobsEntropy.apply(logits, targets, tp_group, float(temperature),
                                           chunk_size, vocab_size)
    return logp.view(targets.shape), entropy.view(targets.shape)


def _default_chunk_size(columns: int, device: torch.device) -> int:
    budget = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    return max(1, budget // (4 * max(columns, 1)))


def _scaled_chunks(x: torch.Tensor, valid: int, chunk: int, temperature: float):
    """Yield ``(start, stop, z, e)`` over row chunks of ``x`` [T, V_local]: ``z`` holds
    ``x[start:stop, :valid] / temperature`` in fp32 and ``e`` is scratch of the same shape,
    both views of two buffers reused across chunks (the forward and the recomputing backward
    walk the logits the same way, and neither allocates per chunk)."""
    n_tok = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    z_buf = torch.empty(min(chunk, n_tok), valid, **f32)
    e_buf = torch.empty_like(z_buf)
    for start in range(0, n_tok, chunk):
        stop = min(start + chunk, n_tok)
        z, e = z_buf[: stop - start], e_buf[: stop - start]
        z.copy_(x[start:stop, :valid])
        if temperature != 1.0:
            z.div_(temperature)
        yield start, stop, z, e


class _LogprobsEntropy(torch.autograd.Function):
    """Forward collectives: one all-reduce MAX and one all-reduce SUM, both of [T]-sized
    per-token statistics. Backward: none (see ``backward``)."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, temperature, chunk_size, vocab_size):
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        y = targets.reshape(-1)
        n_tok = x.shape[0]
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
        first = rank * shard
        valid = min(max(vocab_size - first, 0), shard)  # columns of this shard below vocab_size
        chunk = chunk_size or _default_chunk_size(valid, x.device)
        f32 = dict(dtype=torch.float32, device=x.device)

        # Local statistics of each token, relative to the local max m_loc:
        #   sum_loc = sum_j exp(z_j - m_loc),  wsum_loc = sum_j exp(z_j - m_loc) (z_j - m_loc).
        m_loc = torch.full((n_tok,), float("-inf"), **f32)
        stats = torch.zeros(3, n_tok, **f32)  # rows: sum-exp, weighted sum, target logit
        sum_loc, wsum_loc, z_target = stats[0], stats[1], stats[2]
        if valid > 0 and n_tok > 0:
            for start, stop, z, e in _scaled_chunks(x, valid, chunk, temperature):
                m = torch.amax(z, dim=1, out=m_loc[start:stop])
                z.sub_(m.unsqueeze(1))
                torch.exp(z, out=e)
                torch.sum(e, dim=1, out=sum_loc[start:stop])
                e.mul_(z)
                torch.sum(e, dim=1, out=wsum_loc[start:stop])
            local = y - first
            owned = (local >= 0) & (local < valid)
            picked = x[torch.arange(n_tok, device=x.device), local.clamp(0, valid - 1)]
            z_target.copy_(torch.where(owned, picked.float() / temperature, 0.0))

        if sharded:
            # MAX, not SUM: every rank needs the same reference point m for exp(z - m) to be
            # summable across shards; afterwards each rank rescales its own sums to it.
            m_glob = m_loc.clone()
            dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=tp_group)
            if valid > 0:
                shift = m_loc - m_glob
                scale = torch.exp(shift)
                wsum_loc.add_(shift * sum_loc).mul_(scale)
                sum_loc.mul_(scale)
            # SUM of [3, T]: sum-exp and the p*z numerator are sums over vocabulary columns,
            # which the shards partition; the target logit lives on exactly one rank and the
            # others contribute 0, so its sum is that value, bit-exact. One collective carries
            # all three: the cost of a [T] all-reduce is latency, not bytes.
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
        else:
            m_glob = m_loc

        log_sum = torch.log(sum_loc)
        entropy = log_sum - wsum_loc / sum_loc  # = lse - sum_j p_j z_j, without cancelling m
        # (z_y - m) - log_sum rather than z_y - lse: near-certain tokens have z_y - m ~ 0 and
        # log_sum ~ 0, and keeping m out of the subtraction saves their log-prob from the
        # rounding of a large lse.
        logp = (z_target - m_glob) - log_sum

        ctx.save_for_backward(x, y, m_glob, log_sum, entropy)
        ctx.cfg = (temperature, chunk, first, valid)
        ctx.logits_shape = logits.shape
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        # No collectives: dL/dx_j (module docstring) needs the local column z_j and the
        # per-token m, log S and H, which the forward already all-reduced and saved. The upstream
        # gradients g and h are replicated over TP (the loss is computed on every TP rank),
        # and each rank owns the gradient of its own columns only, so there is nothing to
        # reduce — an all-reduce here would multiply the gradient by TP.
        x, y, m, log_sum, entropy = ctx.saved_tensors
        temperature, chunk, first, valid = ctx.cfg
        n_tok, shard = x.shape
        grad = torch.empty_like(x)
        if valid < shard:
            grad[:, valid:].zero_()
        if valid > 0 and n_tok > 0:
            g = grad_logp.reshape(-1).float()
            h = grad_entropy.reshape(-1).float()
            # With u_j = z_j - m, e_j = exp(u_j), S = exp(log_sum), log p_j = u_j - log_sum:
            #   dL/dx_j = [j = y] g / T + e_j (a + b u_j),
            #   a = -(g + h (H - log_sum)) / (T S),  b = -h / (T S).
            # Folding the per-token constants keeps the per-element work to a few passes, and
            # p = e / S is never formed with a rounded lse (see the forward's log-prob).
            inv = torch.exp(-log_sum) / temperature
            a = -(g + h * (entropy - log_sum)) * inv
            b = -h * inv
            local = y - first
            owned = (local >= 0) & (local < valid)
            onehot = torch.where(owned, g / temperature, 0.0)
            local = local.clamp(0, valid - 1)
            for start, stop, u, e in _scaled_chunks(x, valid, chunk, temperature):
                u.sub_(m[start:stop].unsqueeze(1))
                torch.exp(u, out=e)
                torch.addcmul(a[start:stop].unsqueeze(1), u, b[start:stop].unsqueeze(1), out=u)
                e.mul_(u)
                e[torch.arange(stop - start, device=x.device), local[start:stop]] += \
                    onehot[start:stop]
                grad[start:stop, :valid].copy_(e)
        return grad.view(ctx.logits_shape), None, None, None, None, None
