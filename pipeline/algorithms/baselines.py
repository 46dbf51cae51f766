"""Group baselines of the GRPO family (spec section 1): one advantage per response.

Rows are group-major: ``rewards[j, i]`` is response ``i`` of prompt ``j`` (row ``j*G + i`` of the
per-token tensors). Statistics are taken in float64 and returned in the rewards' dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.collectives import masked_mean_std
from pipeline.algorithms.inputs import check_rewards, check_tokens, result_dtype

log = logging.getLogger(__name__)
_warned_single = False


def warn_single_response_groups() -> None:
    """Log, once per process, that groups of one response get a zero group term."""
    global _warned_single
    if not _warned_single:
        _warned_single = True
        log.warning("groups of one response have no baseline: their group advantage is 0 "
                    "(sample at least 2 responses per prompt)")


def grpo_advantages(rewards: Tensor, *, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """[P,G] rewards -> [P,G] advantages ``(r - mean_g r) / (std_g r + eps)``.

    ``std`` is the unbiased group std (GRPO, arXiv 2402.03300). ``scale=False`` is
    Dr. GRPO (arXiv 2503.20783): the std division biases updates toward
    too-easy and too-hard prompts, so it keeps only ``r - mean_g r``.
    """
    check_rewards(rewards)
    if rewards.shape[1] < 2:
        warn_single_response_groups()
        return torch.zeros(rewards.shape, dtype=result_dtype(rewards), device=rewards.device)
    r = rewards.double()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.to(result_dtype(rewards))


def rloo_advantages(rewards: Tensor) -> Tensor:
    """[P,G] rewards -> [P,G] leave-one-out advantages ``r_i - mean_{j != i} r_j``.

    Equal to ``G/(G-1) * (r_i - mean_g r)``, which needs one pass instead of G.
    """
    check_rewards(rewards)
    g = rewards.shape[1]
    if g < 2:
        warn_single_response_groups()
        return torch.zeros(rewards.shape, dtype=result_dtype(rewards), device=rewards.device)
    r = rewards.double()
    adv = (r - r.mean(dim=1, keepdim=True)) * (g / (g - 1))
    return adv.to(result_dtype(rewards))


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, *, eps: float = 1e-8,
                            group: dist.ProcessGroup | None = None) -> Tensor:
    """[P,G] rewards, [B,T] mask -> [B,T] REINFORCE++-baseline token advantages, 0 on padding.

    ``r - mean_g r`` broadcast over the response's tokens, then whitened with the mean and
    unbiased std of all valid tokens of the step (arXiv 2501.03262, REINFORCE++-baseline):
    every token counts once, so long responses weigh more in the statistics. ``group``: the
    DP process group the step is spread over.
    """
    check_rewards(rewards)
    p, g = rewards.shape
    check_tokens(mask, "mask", rows=p * g)
    keep = mask.bool()
    if g < 2:
        warn_single_response_groups()
    r = rewards.double()
    centred = (r - r.mean(dim=1, keepdim=True)).reshape(-1)
    # Token statistics of a per-sequence value: the sequence's value weighted by its length.
    lengths = keep.sum(dim=1)
    mean, std, _ = masked_mean_std(centred, lengths > 0, unbiased=True, group=group,
                                   weights=lengths)
    whitened = ((centred - mean) / (std + eps)).to(result_dtype(rewards))
    return torch.where(keep, whitened.unsqueeze(1), torch.zeros((), dtype=whitened.dtype))
