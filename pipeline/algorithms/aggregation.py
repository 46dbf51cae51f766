"""Reduce per-token losses to the step loss with global denominators (spec section 1).

Contract shared with ``megatron_ext.train``: each micro-batch on each DP rank returns
``local numerator / GLOBAL denominator``, so the step loss is the plain SUM of the pieces over
micro-batches and DP ranks, and gradient accumulation plus DP reduction reproduce the
single-process loss exactly. The global denominators are fixed once per mini-batch by
:func:`step_denominators`, before it is cut into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.collectives import all_reduce_sum
from pipeline.algorithms.inputs import check_choice, check_same_shape, check_tokens

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                     "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class Denominators:
    """The step-global counts a mini-batch's loss is divided by (float64 scalars)."""

    num_tokens: Tensor  # valid tokens over all micro-batches and DP ranks
    num_seqs: Tensor  # sequences with at least one valid token, same scope


def step_denominators(mask: Tensor, group: dist.ProcessGroup | None = None) -> Denominators:
    """[B,T] mask of this rank's whole mini-batch -> its global token and sequence counts.

    ``group``: the DP process group; without it the counts are local.
    """
    check_tokens(mask, "mask")
    keep = mask.bool()
    counts = torch.stack([keep.sum(), keep.any(dim=1).sum()]).double()
    counts = all_reduce_sum(counts, group)
    return Denominators(num_tokens=counts[0], num_seqs=counts[1])


def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, num_tokens: Tensor | int | None = None,
              num_seqs: Tensor | int | None = None, max_len: int | None = None) -> Tensor:
    """[B,T] per-token losses, [B,T] mask -> scalar, this batch's share of the step loss.

    Modes (names as in verl/OpenRLHF):
      token-mean               sum of masked losses / num_tokens
      seq-mean-token-mean      sum over sequences of (token sum / its length) / num_seqs
      seq-mean-token-sum       sum of masked losses / num_seqs
      seq-mean-token-sum-norm  sum of masked losses / (num_seqs * max_len)   (Dr. GRPO)
    ``num_tokens`` / ``num_seqs`` default to this batch's own counts; pass the step's
    :class:`Denominators` so micro-batches and DP ranks sum to the whole-step value.
    ``max_len`` is Dr. GRPO's constant generation budget; it defaults to ``T``, which is only
    constant if every micro-batch is padded to the same length. Empty batches give 0.
    Padding must hold finite values: it is excluded by ``where``, whose backward still
    multiplies through whatever produced it.
    """
    check_choice(mode, "mode", AGGREGATION_MODES)
    check_tokens(per_token, "per_token")
    check_same_shape(mask, "mask", per_token, "per_token")
    keep = mask.bool()
    losses = torch.where(keep, per_token, torch.zeros((), dtype=per_token.dtype))
    if mode == "token-mean":
        denom = keep.sum() if num_tokens is None else num_tokens
        return losses.sum() / _at_least_one(denom, losses)
    seq_sums = losses.sum(dim=1)
    seqs = keep.any(dim=1).sum() if num_seqs is None else num_seqs
    seqs = _at_least_one(seqs, losses)
    if mode == "seq-mean-token-mean":
        lengths = keep.sum(dim=1).clamp(min=1).to(losses.dtype)
        return (seq_sums / lengths).sum() / seqs
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / seqs
    budget = per_token.shape[1] if max_len is None else max_len
    if budget < 1:
        raise ValueError(f"max_len must be a positive generation budget; got {budget}")
    return seq_sums.sum() / (seqs * budget)


def _at_least_one(count: Tensor | int, like: Tensor) -> Tensor:
    """A count -> a tensor of ``like``'s dtype, at least 1 (an empty batch divides 0 by 1)."""
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)
