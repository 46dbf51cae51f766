"""SPRO: self-guided process rewards and the masked step advantage (arXiv 2507.01551, spec
section 6).

The policy's own log-ratio to the reference is a dense process reward (no reward model):
``p_t = beta * (old_t - ref_t)``. Its prefix sum ``C_t`` scores the partial response; comparing
``C_t`` across the responses of a group that are still generating at step t (the masked step
advantage, MSA) gives token-level credit even when every outcome in the group agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.aggregation import Denominators
from pipeline.algorithms.baselines import grpo_advantages
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.inputs import (check_rewards, check_same_shape, check_tokens,
                                        result_dtype)
from pipeline.algorithms.losses import ppo_clip_loss
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss, on_policy_old


def masked_step_advantage(cumulative: Tensor, active: Tensor, *, std: bool = False,
                          eps: float = 1e-6) -> Tensor:
    """[P,G,T] cumulative process rewards, [P,G,T] active -> [P,G,T] MSA.

    At each step t, ``C_{i,t}`` minus the mean over the group's responses active at t; 0 where
    fewer than two are active (no comparison) and on inactive positions. With ``std`` the
    difference is divided by the unbiased std of the active ``C`` plus ``eps``. Columns sum to
    0 over active rows.
    """
    keep = active.bool()
    idle = ~keep
    # One [P,G,T] float64 buffer, updated in place: on CPU each fresh full-size temporary
    # costs more in page faults than the arithmetic it holds.
    msa = cumulative.double().masked_fill(idle, 0.0)
    count = keep.sum(dim=1, keepdim=True)
    msa.sub_(msa.sum(dim=1, keepdim=True) / count.clamp(min=1)).masked_fill_(idle, 0.0)
    if std:
        var = (msa * msa).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        msa.div_(var.sqrt() + eps)
    return msa.masked_fill_(count < 2, 0.0)


def spro_advantages(rewards: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *,
                    beta: float = 0.05, eps: float = 1e-6, msa_std: bool = False) -> Tensor:
    """[P,G] rewards; [B,T] old_logprobs, ref_logprobs, mask (left-aligned) -> [B,T] token
    advantages ``A_{i,t} = GRPO(r)_i + MSA_{i,t}``, 0 on padding.

    ``beta = 0`` gives exactly the GRPO advantage on every valid token. The process reward is
    detached: it is a reward, not a path for gradients.
    """
    check_rewards(rewards)
    p, g = rewards.shape
    check_tokens(mask, "mask", rows=p * g)
    check_same_shape(old_logprobs, "old_logprobs", mask, "mask")
    check_same_shape(ref_logprobs, "ref_logprobs", mask, "mask")
    keep = mask.bool()
    process = old_logprobs.detach().double() - ref_logprobs.double()
    cumulative = process.masked_fill_(~keep, 0.0).mul_(beta).cumsum_(dim=1)
    t = mask.shape[1]
    msa = masked_step_advantage(cumulative.view(p, g, t), keep.view(p, g, t), std=msa_std,
                                eps=eps).view(p * g, t)
    outcome = grpo_advantages(rewards, eps=eps).double().reshape(-1, 1)
    return msa.add_(outcome).masked_fill_(~keep, 0.0).to(result_dtype(rewards))


def spro_advantages_packed(rewards: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor,
                           cu_seqlens: Tensor, *, mask: Tensor | None = None, beta: float = 0.05,
                           eps: float = 1e-6, msa_std: bool = False) -> Tensor:
    """[P,G] rewards; [N] old_logprobs, ref_logprobs (packed, THD); [B+1] cu_seqlens; optional
    [N] response mask -> [N] token advantages, 0 off the responses.

    Sequence s occupies ``cu_seqlens[s]:cu_seqlens[s+1]``, group-major like the padded layout.
    Step t of a sequence is its t-th response token (``mask``, default every token), so packed
    prompt tokens do not shift the steps. Unpacked to [B,T] by index, computed by
    :func:`spro_advantages`, packed back: identical numbers in both layouts.
    """
    check_rewards(rewards)
    p, g = rewards.shape
    if old_logprobs.dim() != 1:
        raise ValueError(f"old_logprobs must be a packed 1-D [N] tensor; got "
                         f"{tuple(old_logprobs.shape)}")
    check_same_shape(ref_logprobs, "ref_logprobs", old_logprobs, "old_logprobs")
    total = old_logprobs.shape[0]
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != p * g + 1:
        raise ValueError(f"cu_seqlens must be [B+1] = [{p * g + 1}] offsets (B = P*G "
                         f"sequences); got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to N = {total}; got {cu.tolist()}")
    keep = (torch.ones(total, dtype=torch.bool, device=old_logprobs.device) if mask is None
            else check_same_shape(mask, "mask", old_logprobs, "old_logprobs").bool())
    seq = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
    seen = keep.long().cumsum(0)
    seen_before = torch.cat([seen.new_zeros(1), seen])
    before = seen_before[cu[:-1]]
    step = seen - before[seq] - 1
    lengths = seen_before[cu[1:]] - before
    width = int(lengths.max()) if lengths.numel() else 0
    rows, cols = seq[keep], step[keep]
    dense = torch.zeros(p * g, width, dtype=torch.float64, device=old_logprobs.device)
    old_d, ref_d, mask_d = dense.clone(), dense.clone(), dense.bool()
    old_d[rows, cols] = old_logprobs.detach()[keep].double()
    ref_d[rows, cols] = ref_logprobs[keep].double()
    mask_d[rows, cols] = True
    adv = spro_advantages(rewards, old_d, ref_d, mask_d, beta=beta, eps=eps, msa_std=msa_std)
    out = torch.zeros(total, dtype=adv.dtype, device=adv.device)
    out[keep] = adv[rows, cols]
    return out


@dataclass(frozen=True)
class SproConfig(AlgorithmConfig):
    """SPRO's process reward; the loss is PPO clip on token advantages, KL 0."""

    beta: float = 0.05  # process-reward scale
    eps: float = 1e-6
    msa_std: bool = False
    aggregation: str = "seq-mean-token-mean"


def estimate(cfg: SproConfig, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
    """StepBatch (needs ``old_logprobs``, ``ref_logprobs``) -> LossTerms with [B,T] advantages.
    MSA compares responses of one group only: ``group`` is unused."""
    step.require("spro", "old_logprobs", "ref_logprobs")
    advantages = spro_advantages(step.rewards, step.old_logprobs, step.ref_logprobs, step.mask,
                                 beta=cfg.beta, eps=cfg.eps, msa_std=cfg.msa_std)
    return LossTerms(mask=step.mask.bool(), advantages=advantages, old_logprobs=step.old_logprobs,
                     ref_logprobs=step.ref_logprobs, rollout_logprobs=step.rollout_logprobs)


def loss(cfg: SproConfig, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
         entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] logprobs (grad) -> (scalar loss share, metrics): PPO clip on token advantages."""
    per_token = ppo_clip_loss(logprobs, on_policy_old(logprobs, terms), terms.advantages,
                              terms.mask, **cfg.clip)
    return finish_loss(cfg, per_token, logprobs, terms, denominators, entropy)
