"""Step-level reductions over data-parallel ranks.

Spec section "Notation": batch statistics (COPO's global standardisation, JEPO's std, REINFORCE++
whitening, loss denominators) cover the WHOLE rollout step, i.e. every DP rank. Each rank holds
whole groups, so only sums and counts cross ranks. They are constants of the update: inputs are
detached, and the all-reduce never enters the autograd graph. Without a group, nothing is
communicated and the statistic is the local one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Any shape -> same shape, detached: the elementwise sum over the ranks of ``group``."""
    out = tensor.detach()
    if group is None:
        return out
    from megatron_ext.parallel import collective_device

    out = out.to(collective_device(group), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(tensor.device)


def masked_mean_std(values: Tensor, mask: Tensor, *, unbiased: bool,
                    group: dist.ProcessGroup | None = None,
                    weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """values, mask (, weights): same shape -> (mean, std, count), float64 scalars over the
    masked entries of every rank in ``group``.

    ``weights`` count an entry that many times (e.g. a per-sequence value repeated over its
    tokens, without materialising [B,T]). Two passes (mean, then squared deviations) instead of
    one sum of squares: rewards and token advantages can sit far from zero, where
    ``E[x^2] - E[x]^2`` cancels. No entries give mean and std 0; one entry gives std 0 when
    ``unbiased``.
    """
    keep = mask.bool()
    w = keep.double() if weights is None else torch.where(keep, weights.detach().double(), 0.0)
    x = torch.where(keep, values.detach().double(), 0.0)
    first = all_reduce_sum(torch.stack([(w * x).sum(), w.sum()]), group)
    total, count = first[0], first[1]
    mean = total / count.clamp(min=1.0)
    sq = all_reduce_sum((w * (x - mean) ** 2).sum(), group)
    dof = count - 1.0 if unbiased else count
    std = torch.where(dof > 0, (sq / dof.clamp(min=1.0)).sqrt(), torch.zeros_like(sq))
    return mean, std, count
