"""Per-token policy losses, importance corrections and KL estimators (spec section 1).

Every loss here returns the unaggregated ``[B,T]`` tensor, 0 on padding; :func:`aggregate`
turns it into the step loss. Losses are computed in at least float32 and keep their gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.algorithms.inputs import (check_advantages, check_choice, check_same_shape,
                                        check_tokens, loss_dtype)

# exp(20) ~ 5e8: far outside any clip range, and finite in float32 even when multiplied by an
# advantage, so a stale or garbage log-prob cannot overflow the loss.
LOG_RATIO_LIMIT = 20.0
KL_KINDS = ("k1", "k2", "k3")
TIS_MODES = ("truncate", "mask")


def clipped_objective(log_ratio: Tensor, advantages: Tensor, *, eps_low: float, eps_high: float,
                      dual_clip: float | None) -> Tensor:
    """[B,T] log-ratio, [B,1] or [B,T] advantages -> [B,T] PPO clip loss (to minimise).

    ``max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high))``; asymmetric eps is DAPO's
    Clip-Higher (arXiv 2503.14476). Dual clip (arXiv 1912.09729) caps the loss
    of negative-advantage tokens at ``-c*A``, so a huge ratio on a bad token cannot dominate.
    """
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise ValueError(f"eps_low must be in [0, 1) and eps_high >= 0; got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    loss = torch.maximum(-advantages * ratio,
                         -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (3.0 is typical) or None; got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                  eps_low: float = 0.2, eps_high: float = 0.2,
                  dual_clip: float | None = None) -> Tensor:
    """[B,T] logprobs (grad), old_logprobs, mask; advantages [B] or [B,T] -> [B,T] token loss."""
    keep, adv = _token_inputs(logprobs, mask, advantages, old_logprobs=old_logprobs)
    log_ratio = torch.where(keep, logprobs.to(adv.dtype) - old_logprobs.detach().to(adv.dtype),
                            0.0)
    loss = clipped_objective(log_ratio, adv, eps_low=eps_low, eps_high=eps_high,
                             dual_clip=dual_clip)
    return torch.where(keep, loss, 0.0)


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              eps_low: float = 3e-4, eps_high: float = 4e-4,
              dual_clip: float | None = None) -> Tensor:
    """[B,T] logprobs (grad), old_logprobs, mask; advantages [B] or [B,T] -> [B,T] token loss.

    GSPO (arXiv 2507.18071, in its GSPO-token form): the ratio is the
    length-normalised sequence ratio ``s_i = exp(mean_t (logp - old))``, applied per token as
    ``exp(logp_t - sg(logp_t) + sg(log s_i))``: its value is ``s_i`` and its gradient
    ``s_i * grad logp_t``, so seq-mean-token-mean aggregation gives the paper's gradient.
    """
    keep, adv = _token_inputs(logprobs, mask, advantages, old_logprobs=old_logprobs)
    lp = logprobs.to(adv.dtype)
    token_lr = torch.where(keep, lp - old_logprobs.detach().to(adv.dtype), 0.0)
    lengths = keep.sum(dim=1, keepdim=True).clamp(min=1)
    seq_lr = (token_lr.sum(dim=1, keepdim=True) / lengths).detach()
    log_ratio = torch.where(keep, lp - lp.detach() + seq_lr, 0.0)
    loss = clipped_objective(log_ratio, adv, eps_low=eps_low, eps_high=eps_high,
                             dual_clip=dual_clip)
    return torch.where(keep, loss, 0.0)


def nll_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """[B,T] logprobs (grad), mask; advantages [B] or [B,T] -> [B,T] ``-A * logp``.

    The advantage-weighted likelihood with no ratio and no clip (AAPO's loss, JEPO's CoT
    term; spec sections 4 and 5): exact policy gradient for on-policy data.
    """
    keep, adv = _token_inputs(logprobs, mask, advantages)
    return torch.where(keep, -adv * logprobs.to(adv.dtype), 0.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """[B,T] logprobs (grad), ref_logprobs -> [B,T] per-token KL(pi || ref) estimate, unmasked.

    Schulman's estimators with ``d = logp - ref``: k1 ``d``; k2 ``d^2/2``; k3
    ``exp(-d) - 1 + d`` (unbiased and non-negative; ``-d`` clamped to +-20 and the result to
    [-10, 10] so one token with a stale reference cannot blow up the loss).
    """
    check_choice(kind, "kind", KL_KINDS)
    check_tokens(logprobs, "logprobs")
    check_same_shape(ref_logprobs, "ref_logprobs", logprobs, "logprobs")
    dtype = loss_dtype(logprobs)
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    neg = (-d).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return (neg.exp() - 1.0 - neg).clamp(-10.0, 10.0)


def tis_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                mode: str = "truncate", cap: float = 2.0, low: float | None = None) -> Tensor:
    """[B,T] old_logprobs (trainer), rollout_logprobs (engine), mask -> [B,T] detached weights.

    Corrects the engine/trainer mismatch (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): the per-token policy loss is multiplied by the weight.
    ``truncate``: ``min(exp(old - roll), cap)``. ``mask``: the ratio itself where it lies in
    ``[low, cap]`` and 0 outside (masked IS); ``low`` defaults to ``1/cap``. Padding gets 0.
    """
    check_choice(mode, "mode", TIS_MODES)
    check_tokens(old_logprobs, "old_logprobs")
    check_same_shape(rollout_logprobs, "rollout_logprobs", old_logprobs, "old_logprobs")
    check_same_shape(mask, "mask", old_logprobs, "old_logprobs")
    if cap <= 0:
        raise ValueError(f"cap must be positive (2.0 is typical); got {cap}")
    keep = mask.bool()
    dtype = loss_dtype(old_logprobs)
    log_ratio = torch.where(keep, old_logprobs.detach().to(dtype) - rollout_logprobs.to(dtype),
                            0.0)
    ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT).exp()
    if mode == "truncate":
        weights = ratio.clamp(max=cap)
    else:
        low = 1.0 / cap if low is None else low
        if not 0 <= low <= cap:
            raise ValueError(f"low must lie in [0, cap={cap}]; got {low}")
        weights = torch.where((ratio >= low) & (ratio <= cap), ratio, 0.0)
    return torch.where(keep, weights, 0.0)


def _token_inputs(logprobs: Tensor, mask: Tensor, advantages: Tensor,
                  old_logprobs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Check the per-token arguments of a loss; return the bool mask and the advantages as
    [B,1] or [B,T] in the loss dtype (advantages are constants: detached)."""
    check_tokens(logprobs, "logprobs")
    check_same_shape(mask, "mask", logprobs, "logprobs")
    if old_logprobs is not None:
        check_same_shape(old_logprobs, "old_logprobs", logprobs, "logprobs")
    adv = check_advantages(advantages, logprobs).detach().to(loss_dtype(logprobs))
    return mask.bool(), adv
