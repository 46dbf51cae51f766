"""What every algorithm's loss shares: the config knobs, and the terms added to its policy
gradient (TIS correction, KL to the reference, entropy bonus) under one aggregation.

An algorithm module supplies the per-token policy-gradient loss; :func:`finish_loss` turns it
into the micro-batch's share of the step loss (spec section 1). Every reported metric is a
share of the same kind, so the trainer SUMS metrics over micro-batches and DP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.algorithms.aggregation import AGGREGATION_MODES, Denominators, aggregate
from pipeline.algorithms.batch import LossTerms
from pipeline.algorithms.inputs import check_choice
from pipeline.algorithms.losses import KL_KINDS, TIS_MODES, kl_penalty, tis_weights
from pipeline.algorithms.pods import Downsample


@dataclass(frozen=True)
class AlgorithmConfig:
    """Knobs every algorithm shares: PODS down-sampling, the clip range, the aggregation and
    the added terms. Each algorithm's config extends it."""

    downsample: Downsample | None = None  # PODS; None trains on every rollout
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low is DAPO's Clip-Higher
    dual_clip: float | None = None  # c > 1 caps negative-advantage losses at -c*A
    aggregation: str = "token-mean"  # one of AGGREGATION_MODES
    max_len: int | None = None  # seq-mean-token-sum-norm's constant; default: T
    kl_coef: float = 0.0  # beta; > 0 needs StepBatch.ref_logprobs
    kl_kind: str = "k3"
    entropy_coef: float = 0.0  # > 0 needs the policy's token entropy in loss()
    tis: str | None = None  # None | "truncate" | "mask"; needs rollout_logprobs
    tis_cap: float = 2.0
    tis_low: float | None = None  # mask mode's lower bound; default 1/tis_cap

    def __post_init__(self):
        if self.downsample is not None and not isinstance(self.downsample, Downsample):
            raise ValueError(f"downsample must be a Downsample or None; got {self.downsample!r}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"eps_low must be in [0, 1); got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"eps_high must be >= 0; got {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (3.0 is typical) or None; "
                             f"got {self.dual_clip}")
        check_choice(self.aggregation, "aggregation", AGGREGATION_MODES)
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be a positive token budget or None; got {self.max_len}")
        check_choice(self.kl_kind, "kl_kind", KL_KINDS)
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef and entropy_coef must be >= 0; got {self.kl_coef}, "
                             f"{self.entropy_coef}")
        if self.tis is not None:
            check_choice(self.tis, "tis", TIS_MODES)
        if self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive; got {self.tis_cap}")

    @property
    def clip(self) -> dict:
        """The clip keywords of the PPO-style losses."""
        return dict(eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip)


def finish_loss(cfg: AlgorithmConfig, policy_loss: Tensor, logprobs: Tensor, terms: LossTerms,
                denominators: Denominators, entropy: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] per-token policy loss, [B,T] logprobs (grad) -> (scalar loss share, metrics).

    ``policy_loss`` covers ``terms.loss_mask``. The TIS weight, the KL (``+ kl_coef *
    agg(kl)``) and the entropy bonus (``- entropy_coef * agg(H)``) cover the sampled tokens
    ``terms.mask``. All terms share ``cfg.aggregation`` and the step's ``denominators``.
    ``entropy``: [B,T] token entropy of the policy, with grad.
    """
    old = on_policy_old(logprobs, terms)
    if cfg.tis is not None:
        if terms.rollout_logprobs is None:
            raise ValueError(f"tis={cfg.tis!r} needs StepBatch.rollout_logprobs: the rollout "
                             f"engine's log-probs of the sampled tokens")
        weights = tis_weights(old, terms.rollout_logprobs, terms.mask, mode=cfg.tis,
                              cap=cfg.tis_cap, low=cfg.tis_low)
        # Only sampled tokens have an engine log-prob; JEPO's appended answer keeps weight 1.
        policy_loss = policy_loss * torch.where(terms.mask, weights, 1.0)

    def share(per_token: Tensor, mask: Tensor) -> Tensor:
        return aggregate(per_token, mask, cfg.aggregation, num_tokens=denominators.num_tokens,
                         num_seqs=denominators.num_seqs, max_len=cfg.max_len)

    pg = share(policy_loss, terms.loss_mask)
    total = pg
    metrics = {"pg_loss": pg.detach()}
    if cfg.kl_coef > 0:
        if terms.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs StepBatch.ref_logprobs: the frozen reference "
                             "model's log-probs (or set kl_coef=0)")
        kl = share(kl_penalty(logprobs, terms.ref_logprobs, cfg.kl_kind), terms.mask)
        total = total + cfg.kl_coef * kl
        metrics["kl"] = kl.detach()
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the policy's token entropy [B,T] in loss()")
        bonus = share(entropy.to(policy_loss.dtype), terms.mask)
        total = total - cfg.entropy_coef * bonus
        metrics["entropy"] = bonus.detach()
    metrics["loss"] = total.detach()
    return total, metrics


def on_policy_old(logprobs: Tensor, terms: LossTerms) -> Tensor:
    """[B,T] the ``old`` log-probs of the ratio: the recorded ones, or ``logprobs`` detached
    (ratio 1) when the step makes one on-policy update and none were recorded."""
    return terms.old_logprobs if terms.old_logprobs is not None else logprobs.detach()
