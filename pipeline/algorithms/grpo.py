"""The GRPO family as algorithms: GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, DAPO, GSPO and
PODS share one estimator (a group baseline) and one loss (PPO clip on a token or sequence
ratio); the presets differ only in config (spec section 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.aggregation import Denominators
from pipeline.algorithms.baselines import (grpo_advantages, reinforce_pp_advantages,
                                           rloo_advantages)
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.dapo import overlong_penalty
from pipeline.algorithms.inputs import check_choice
from pipeline.algorithms.losses import gspo_loss, ppo_clip_loss
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss, on_policy_old

BASELINES = ("grpo", "rloo", "reinforce_pp")
RATIOS = ("token", "sequence")


@dataclass(frozen=True)
class GrpoConfig(AlgorithmConfig):
    """A group-baseline advantage and a PPO-clip loss."""

    baseline: str = "grpo"  # grpo | rloo | reinforce_pp
    scale: bool = True  # grpo: divide by the group std (False: Dr. GRPO)
    eps: float = 1e-6  # grpo std epsilon (PODS uses 1e-4 on the subset)
    ratio: str = "token"  # token: PPO; sequence: GSPO (needs seq-mean-token-mean)
    dynamic_sampling: bool = False  # DAPO: trainer refills degenerate groups
    max_sampling_rounds: int = 4  # DAPO: draws before training on a short batch
    overlong_max_len: int | None = None  # DAPO overlong shaping: L_max (None: off)
    overlong_cache_len: int = 4096  # DAPO: L_c, the soft-penalty band before L_max

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.baseline, "baseline", BASELINES)
        check_choice(self.ratio, "ratio", RATIOS)
        if self.ratio == "sequence" and self.aggregation != "seq-mean-token-mean":
            raise ValueError("ratio='sequence' (GSPO) needs aggregation='seq-mean-token-mean': "
                             "its gradient is the sequence ratio times the MEAN token gradient")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds must be >= 1; got {self.max_sampling_rounds}")
        overlong = self.overlong_max_len
        if overlong is not None and not 0 < self.overlong_cache_len <= overlong:
            raise ValueError(f"overlong_cache_len must be in (0, overlong_max_len="
                             f"{self.overlong_max_len}]; got {self.overlong_cache_len}")


def estimate(cfg: GrpoConfig, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
    """StepBatch -> LossTerms with [B] advantages ([B,T] for REINFORCE++). ``group``: DP group,
    used by REINFORCE++'s whitening only; group baselines never cross ranks."""
    rewards = step.rewards
    if cfg.overlong_max_len is not None:
        lengths = step.mask.bool().sum(dim=1)
        penalty = overlong_penalty(lengths, max_len=cfg.overlong_max_len,
                                   cache_len=cfg.overlong_cache_len)
        rewards = rewards + penalty.view(rewards.shape).to(rewards.dtype)
    if cfg.baseline == "grpo":
        advantages = grpo_advantages(rewards, scale=cfg.scale, eps=cfg.eps).reshape(-1)
    elif cfg.baseline == "rloo":
        advantages = rloo_advantages(rewards).reshape(-1)
    else:
        advantages = reinforce_pp_advantages(rewards, step.mask, group=group)
    return LossTerms(mask=step.mask.bool(), advantages=advantages, old_logprobs=step.old_logprobs,
                     ref_logprobs=step.ref_logprobs, rollout_logprobs=step.rollout_logprobs)


def loss(cfg: GrpoConfig, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
         entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] logprobs (grad) -> (scalar loss share, metrics): PPO clip (GSPO with
    ``ratio='sequence'``) plus the shared terms of :func:`finish_loss`."""
    ratio_loss = gspo_loss if cfg.ratio == "sequence" else ppo_clip_loss
    per_token = ratio_loss(logprobs, on_policy_old(logprobs, terms), terms.advantages, terms.mask,
                           **cfg.clip)
    return finish_loss(cfg, per_token, logprobs, terms, denominators, entropy)
