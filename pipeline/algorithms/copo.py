"""COPO: consistency-aware policy optimisation (arXiv 2508.04138, spec section 3).

A group whose answers all agree gives GRPO no signal. COPO adds a global advantage (the
prompt's mean reward standardised over the whole step) and blends the two per response with
a weight gated by the group's answer-consistency entropy: confident groups learn mostly from
the global term, diverse groups from the local one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.aggregation import Denominators
from pipeline.algorithms.baselines import grpo_advantages
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.collectives import masked_mean_std
from pipeline.algorithms.inputs import (check_advantages, check_choice, check_rewards,
                                        check_same_shape, result_dtype)
from pipeline.algorithms.losses import ppo_clip_loss
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss, on_policy_old

ZERO_MASKS = ("response", "group", "none")


def consistency_entropy(answer_ids: Tensor) -> Tensor:
    """[P,G] answer-class ids -> [P] float64 entropy (bits) of each group's answer distribution.

    Spec section 3: ``H_j = -sum_u p_u log2 p_u`` over answer classes, range [0, log2 G].
    Computed as the mean over responses of ``-log2 p(class of i)``, which needs no class
    vocabulary: ids are only compared for equality.
    """
    if answer_ids.dim() != 2:
        raise ValueError(f"answer_ids must be a 2-D [P, G] tensor; got {tuple(answer_ids.shape)}")
    g = answer_ids.shape[1]
    same = answer_ids.unsqueeze(2) == answer_ids.unsqueeze(1)
    share = same.sum(dim=2).double() / max(g, 1)
    return -share.log2().mean(dim=1)


def copo_advantages(rewards: Tensor, answer_ids: Tensor, *, correct: Tensor | None = None,
                    gamma: float = 5.0, rho: float = 1.0, eps: float = 1e-6,
                    zero_mask: str = "response", consistency_reward: bool = False,
                    group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """[P,G] rewards, answer_ids (, correct) -> (local, global_, local_weight), each [P,G].

    - local: GRPO on the group.
    - global_: ``R_j = mean_g r`` (times ``1 - lambda_G H_j`` with ``consistency_reward``,
      ``lambda_G = (1 - 1/G)/log2 G``), standardised over all prompts of the step on every
      rank of ``group`` (unbiased std, ``eps``); 0 with a single prompt in the step.
    - local_weight: ``sigmoid(gamma*(H_j - rho))``, zeroed per ``zero_mask``:
      ``response`` keeps it only on correct responses (``correct`` defaults to ``r != 0``) so
      wrong ones learn from the global term alone; ``group`` keeps it where the local
      advantage is non-zero; ``none`` keeps it everywhere.
    """
    check_rewards(rewards)
    check_same_shape(answer_ids, "answer_ids", rewards, "rewards")
    check_choice(zero_mask, "zero_mask", ZERO_MASKS)
    if correct is None:
        correct = rewards != 0
    check_same_shape(correct, "correct", rewards, "rewards")
    p, g = rewards.shape
    local = grpo_advantages(rewards, eps=eps).double()
    entropy = consistency_entropy(answer_ids)
    prompt_reward = rewards.double().mean(dim=1)
    if consistency_reward and g > 1:
        # lambda_G is undefined for G = 1, where H = 0 and the scale is 1 in the limit anyway.
        prompt_reward = prompt_reward * (1.0 - (1.0 - 1.0 / g) / math.log2(g) * entropy)
    mean, std, _ = masked_mean_std(prompt_reward, torch.ones_like(prompt_reward, dtype=torch.bool),
                                   unbiased=True, group=group)
    global_ = ((prompt_reward - mean) / (std + eps)).unsqueeze(1).expand(p, g)
    weight = torch.sigmoid(gamma * (entropy - rho)).unsqueeze(1).expand(p, g)
    if zero_mask == "response":
        weight = weight * correct.double()
    elif zero_mask == "group":
        weight = weight * (local != 0).double()
    dtype = result_dtype(rewards)
    return local.to(dtype), global_.to(dtype), weight.to(dtype)


def copo_loss(logprobs: Tensor, old_logprobs: Tensor, local: Tensor, global_: Tensor,
              local_weight: Tensor, mask: Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
              dual_clip: float | None = 3.0) -> Tensor:
    """[B,T] logprobs (grad), old_logprobs, mask; local, global_, local_weight [B] or [B,T]
    -> [B,T] ``w * l(A_loc) + (1 - w) * l(A_glob)``, ``l`` the PPO clip loss.

    COPO blends the LOSSES (spec section 3): once a ratio is clipped, ``l`` is not linear in the
    advantage, and blending advantages first gives a different objective. Dual clip 3 is the
    release's setting.
    """
    w = check_advantages(local_weight, logprobs, "local_weight").detach().to(
        torch.promote_types(logprobs.dtype, torch.float32))
    clip = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
    local_loss = ppo_clip_loss(logprobs, old_logprobs, local, mask, **clip)
    global_loss = ppo_clip_loss(logprobs, old_logprobs, global_, mask, **clip)
    return w * local_loss + (1.0 - w) * global_loss


@dataclass(frozen=True)
class CopoConfig(AlgorithmConfig):
    """COPO's gate and blend; the loss is PPO clip with the release's dual clip."""

    gamma: float = 5.0  # gate sharpness (the 3B run used 20)
    rho: float = 1.0  # entropy threshold in bits (the 3B run used 1.5)
    eps: float = 1e-6
    zero_mask: str = "response"  # response | group | none
    consistency_reward: bool = False
    dual_clip: float | None = 3.0
    aggregation: str = "seq-mean-token-mean"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.zero_mask, "zero_mask", ZERO_MASKS)


def estimate(cfg: CopoConfig, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
    """StepBatch (needs ``answer_ids``) -> LossTerms with [B] local and global advantages and
    local weight; ``group``: the DP group the global standardisation runs over."""
    step.require("copo", "answer_ids")
    local, global_, weight = copo_advantages(
        step.rewards, step.answer_ids, correct=step.correct, gamma=cfg.gamma, rho=cfg.rho,
        eps=cfg.eps, zero_mask=cfg.zero_mask, consistency_reward=cfg.consistency_reward,
        group=group)
    return LossTerms(mask=step.mask.bool(), advantages=local.reshape(-1),
                     global_advantages=global_.reshape(-1), local_weight=weight.reshape(-1),
                     old_logprobs=step.old_logprobs, ref_logprobs=step.ref_logprobs,
                     rollout_logprobs=step.rollout_logprobs)


def loss(cfg: CopoConfig, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
         entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] logprobs (grad) -> (scalar loss share, metrics): the blended clip loss."""
    per_token = copo_loss(logprobs, on_policy_old(logprobs, terms), terms.advantages,
                          terms.global_advantages, terms.local_weight, terms.mask, **cfg.clip)
    return finish_loss(cfg, per_token, logprobs, terms, denominators, entropy)
