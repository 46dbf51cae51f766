"""AAPO: advantage momentum against a frozen reference policy (arXiv 2505.14264, spec section 4).

When a group's rewards all agree the group advantage vanishes. AAPO adds the clipped margin
between each policy sample's reward and that of a paired sample from the frozen initial
policy, so a group that is uniformly better than it used to be still gets pushed up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.aggregation import Denominators
from pipeline.algorithms.baselines import grpo_advantages
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.inputs import check_rewards, check_same_shape, result_dtype
from pipeline.algorithms.losses import nll_loss, ppo_clip_loss
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss, on_policy_old


def aapo_advantages(rewards: Tensor, ref_rewards: Tensor, *, scale: bool = True,
                    eps: float = 1e-4, margin_low: float = 0.2,
                    margin_high: float = 0.28) -> Tensor:
    """[P,G] rewards, ref_rewards -> [P,G] ``A_hat + clip(r - ref_r, -margin_low, margin_high)``.

    ``A_hat = (r - mean_g r)/(std_g r + eps)`` (``scale=False``: no std division; groups of one:
    0). ``ref_rewards[j, i]`` is the reward of the i-th sample the frozen initial policy drew
    for prompt j, paired with policy sample i ("advantage momentum"). The
    asymmetric clip keeps the momentum term from outweighing the group term.
    """
    check_rewards(rewards)
    check_rewards(ref_rewards, "ref_rewards")
    check_same_shape(ref_rewards, "ref_rewards", rewards, "rewards")
    if margin_low < 0 or margin_high < 0:
        raise ValueError(f"margin_low and margin_high must be >= 0; got {margin_low}, "
                         f"{margin_high}")
    group_adv = grpo_advantages(rewards, scale=scale, eps=eps).double()
    momentum = (rewards.double() - ref_rewards.double()).clamp(-margin_low, margin_high)
    return (group_adv + momentum).to(result_dtype(rewards))


@dataclass(frozen=True)
class AapoConfig(AlgorithmConfig):
    """AAPO's advantage and its loss: advantage-weighted NLL, or PPO clip with ``ppo_clip``."""

    scale: bool = True
    eps: float = 1e-4
    margin_low: float = 0.2
    margin_high: float = 0.28
    ppo_clip: bool = False  # for several optimiser steps per rollout; the pure form is on-policy

    def __post_init__(self):
        super().__post_init__()
        if self.margin_low < 0 or self.margin_high < 0:
            raise ValueError(f"margin_low and margin_high must be >= 0; got {self.margin_low}, "
                             f"{self.margin_high}")


def estimate(cfg: AapoConfig, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
    """StepBatch (needs ``ref_rewards``) -> LossTerms with [B] advantages. No step statistic:
    ``group`` is accepted for a uniform signature and unused."""
    step.require("aapo", "ref_rewards")
    advantages = aapo_advantages(step.rewards, step.ref_rewards, scale=cfg.scale, eps=cfg.eps,
                                 margin_low=cfg.margin_low, margin_high=cfg.margin_high)
    return LossTerms(mask=step.mask.bool(), advantages=advantages.reshape(-1),
                     old_logprobs=step.old_logprobs, ref_logprobs=step.ref_logprobs,
                     rollout_logprobs=step.rollout_logprobs)


def loss(cfg: AapoConfig, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
         entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] logprobs (grad) -> (scalar loss share, metrics): ``-A * logp`` (or PPO clip)."""
    if cfg.ppo_clip:
        per_token = ppo_clip_loss(logprobs, on_policy_old(logprobs, terms), terms.advantages,
                                  terms.mask, **cfg.clip)
    else:
        per_token = nll_loss(logprobs, terms.advantages, terms.mask)
    return finish_loss(cfg, per_token, logprobs, terms, denominators, entropy)
