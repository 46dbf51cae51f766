"""JEPO: Jensen's evidence lower bound for unverifiable answers (arXiv 2503.19618, spec section 5).

The chain of thought ``c`` is latent and the reference answer ``a*`` is scored by the policy's
own likelihood ``ell_i = log pi(a* | x, c_i)`` (a SUM over the answer tokens). The training
signal for ``c_i`` is how much sample i contributes to the multi-sample bound
``Lhat = logsumexp(ell) - log n``; the answer tokens get the bound's own gradient,
``sum_i softmax(ell)_i grad ell_i``. Everything log-space is done in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.algorithms.aggregation import Denominators
from pipeline.algorithms.baselines import rloo_advantages
from pipeline.algorithms.batch import LossTerms, StepBatch
from pipeline.algorithms.collectives import masked_mean_std
from pipeline.algorithms.inputs import (check_advantages, check_choice, check_rewards,
                                        check_same_shape, check_tokens, loss_dtype, result_dtype)
from pipeline.algorithms.jepo_sequences import DEFAULT_DELIMITER
from pipeline.algorithms.objective import AlgorithmConfig, finish_loss

N1_MODES = ("raw", "zero")


def jepo_advantages(answer_logprob_sums: Tensor, valid: Tensor, *, multi_sample: bool = True,
                    n1_mode: str = "raw") -> Tensor:
    """[P,G] ell, [P,G] valid -> [P,G] raw CoT advantages (before :func:`jepo_normalize`).

    Multi-sample (default): ``A_i = Lhat - v_i`` with ``Lhat = logsumexp(ell) - log n`` and the
    leave-one-out bound ``v_i = logsumexp_{j != i}(ell) - log(n - 1)``; these do not sum to 0.
    Single-sample: ``A_i = ell_i - mean_{j != i} ell_j``. Only valid samples count (``n`` is
    the group's valid count); invalid ones get 0. A group with one valid sample has no
    leave-one-out baseline: its sample gets ``ell`` (``n1_mode="raw"``) or 0 (``"zero"``).
    """
    check_choice(n1_mode, "n1_mode", N1_MODES)
    x, keep = _valid_ell(answer_logprob_sums, valid)
    n = keep.sum(dim=1, keepdim=True).double()
    if multi_sample:
        logits = torch.where(keep, x, -math.inf)
        bound = torch.logsumexp(logits, dim=1, keepdim=True) - n.clamp(min=1).log()
        # Leave-one-out over a [P,G,G] copy with the diagonal removed: exact, where the O(G)
        # form log(exp(lse) - exp(ell_i)) cancels catastrophically when ell_i dominates.
        others = logits.unsqueeze(1).expand(-1, logits.shape[1], -1).clone()
        others.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        loo_bound = torch.logsumexp(others, dim=2) - (n - 1).clamp(min=1).log()
        adv = bound - loo_bound
    else:
        total = torch.where(keep, x, 0.0).sum(dim=1, keepdim=True)
        adv = x - (total - x) / (n - 1).clamp(min=1)
    adv = torch.where(keep & (n >= 2), adv, 0.0)
    if n1_mode == "raw":
        adv = torch.where(keep & (n == 1), x, adv)
    return adv.to(result_dtype(answer_logprob_sums))


def jepo_normalize(adv: Tensor, valid: Tensor, *, eps: float = 1e-8, clip: float = 1.0,
                   group: dist.ProcessGroup | None = None) -> Tensor:
    """[P,G] adv, valid -> [P,G] ``clip(A / (std(A) + eps), -clip, clip)``, 0 where invalid.

    ``std`` is the population std over the valid samples of the whole step (every rank of
    ``group``). No mean is subtracted: the multi-sample advantages are not centred by design.
    """
    check_same_shape(valid, "valid", adv, "adv")
    keep = valid.bool()
    _, std, _ = masked_mean_std(adv, keep, unbiased=False, group=group)
    out = torch.where(keep, (adv.double() / (std + eps)).clamp(-clip, clip), 0.0)
    return out.to(result_dtype(adv))


def jepo_format_advantages(formatted: Tensor, *, penalty: float = -10.0, eps: float = 1e-8,
                           clip: float = 1.0, group: dist.ProcessGroup | None = None) -> Tensor:
    """[P,G] bool (delimiter present) -> [P,G] formatting advantages.

    Reward ``penalty`` for a sample without the delimiter, 0 otherwise; RLOO baseline; the
    same normalisation as the CoT advantages, over every sample of the step. Applied to all
    sampled tokens of the sample: without it a policy could dodge the answer term by never
    writing the delimiter.
    """
    if formatted.dim() != 2:
        raise ValueError(f"formatted must be a 2-D [P, G] tensor; got {tuple(formatted.shape)}")
    rewards = torch.where(formatted.bool(), 0.0, float(penalty)).double()
    every = torch.ones_like(formatted, dtype=torch.bool)
    adv = jepo_normalize(rloo_advantages(rewards), every, eps=eps, clip=clip, group=group)
    return adv.to(torch.get_default_dtype())


def jepo_answer_weights(answer_logprob_sums: Tensor, valid: Tensor) -> Tensor:
    """[P,G] ell, valid -> [P,G] ``softmax(ell)`` over each group's valid samples, 0 elsewhere.

    The gradient of ``Lhat`` is ``sum_i softmax(ell)_i grad ell_i``; computing the weights once
    from the no-grad pass makes the supervised term a per-token sum, separable across
    micro-batches. Groups with no valid sample get all-zero weights.
    """
    x, keep = _valid_ell(answer_logprob_sums, valid)
    logits = torch.where(keep, x, -math.inf)
    weights = torch.softmax(logits, dim=1)
    return torch.where(keep, weights, 0.0).to(result_dtype(answer_logprob_sums))


def jepo_bound(answer_logprob_sums: Tensor, valid: Tensor) -> Tensor:
    """[P,G] ell, valid -> [P] ``Lhat = logsumexp(ell) - log n_valid``; 0 for all-invalid groups."""
    x, keep = _valid_ell(answer_logprob_sums, valid)
    logits = torch.where(keep, x, -math.inf)
    n = keep.sum(dim=1)
    bound = torch.logsumexp(logits, dim=1) - n.clamp(min=1).double().log()
    return torch.where(n > 0, bound, 0.0).to(result_dtype(answer_logprob_sums))


def jepo_loss(logprobs: Tensor, advantages: Tensor, cot_mask: Tensor, answer_mask: Tensor,
              answer_weights: Tensor, *, beta_sup: float = 1.0) -> Tensor:
    """[B,T] logprobs (grad), cot_mask, answer_mask; advantages, answer_weights [B] -> [B,T].

    Per prompt the loss is ``-(1/n) sum_i A_i sum_t log pi(c_i,t) - beta_sup * Lhat``. As a
    per-token tensor: ``-A_i logp`` on CoT tokens and ``-beta_sup * u_i * logp`` on answer
    tokens, where ``answer_weights`` ``u_i = n * softmax(ell)_i`` (n the group size). Then
    ``seq-mean-token-sum`` over the union of the masks, which divides by the step's ``P*n``
    sequences, gives the mean over prompts of the per-prompt loss with the exact bound
    gradient. ``advantages`` include the formatting term; the caller adds KL on CoT tokens.
    """
    check_tokens(logprobs, "logprobs")
    check_same_shape(cot_mask, "cot_mask", logprobs, "logprobs")
    check_same_shape(answer_mask, "answer_mask", logprobs, "logprobs")
    dtype = loss_dtype(logprobs)
    adv = check_advantages(advantages, logprobs).detach().to(dtype)
    weight = check_advantages(answer_weights, logprobs, "answer_weights").detach().to(dtype)
    lp = logprobs.to(dtype)
    cot = torch.where(cot_mask.bool(), -adv * lp, 0.0)
    answer = torch.where(answer_mask.bool(), -beta_sup * weight * lp, 0.0)
    return cot + answer


@dataclass(frozen=True)
class JepoConfig(AlgorithmConfig):
    """JEPO's bound, normalisation and supervised weight; no ratio, no clip."""

    multi_sample: bool = True
    n1_mode: str = "raw"  # raw | zero: a group with one valid sample
    norm_eps: float = 1e-8
    norm_clip: float = 1.0
    format_penalty: float = -10.0
    beta_sup: float = 1.0  # 0.01 for short-answer math
    delimiter: str = DEFAULT_DELIMITER  # for build_jepo_sequence
    answer_eos: bool = False  # append EOS to a* (scored as part of the answer)
    kl_coef: float = 1e-3
    aggregation: str = "seq-mean-token-sum"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.n1_mode, "n1_mode", N1_MODES)
        if self.aggregation != "seq-mean-token-sum":
            raise ValueError("JEPO needs aggregation='seq-mean-token-sum': its loss is a sum "
                             "over each sample's tokens, averaged over samples")
        if not self.delimiter:
            raise ValueError("delimiter must be a non-empty string")


def estimate(cfg: JepoConfig, step: StepBatch, group: dist.ProcessGroup | None = None) -> LossTerms:
    """StepBatch (needs ``valid``, ``answer_mask``, and ``answer_logprob_sums`` or
    ``old_logprobs``) -> LossTerms with [B] CoT advantages (bound + formatting) and answer
    weights. ``group``: the DP group both normalisations run over."""
    step.require("jepo", "valid", "answer_mask")
    ell = step.answer_logprob_sums
    if ell is None:
        step.require("jepo", "old_logprobs")
        scored = torch.where(step.answer_mask.bool(), step.old_logprobs.detach().double(), 0.0)
        ell = scored.sum(dim=1).view(step.rewards.shape)
    valid = step.valid.bool()
    formatted = valid if step.formatted is None else step.formatted.bool()
    norm = dict(eps=cfg.norm_eps, clip=cfg.norm_clip, group=group)
    bound_adv = jepo_normalize(jepo_advantages(ell, valid, multi_sample=cfg.multi_sample,
                                               n1_mode=cfg.n1_mode), valid, **norm)
    format_adv = jepo_format_advantages(formatted, penalty=cfg.format_penalty, **norm)
    weights = jepo_answer_weights(ell, valid) * step.group_size
    return LossTerms(mask=step.mask.bool(), advantages=(bound_adv + format_adv).reshape(-1),
                     answer_mask=step.answer_mask.bool(), answer_weight=weights.reshape(-1),
                     old_logprobs=step.old_logprobs, ref_logprobs=step.ref_logprobs,
                     rollout_logprobs=step.rollout_logprobs)


def loss(cfg: JepoConfig, logprobs: Tensor, terms: LossTerms, denominators: Denominators,
         entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """[B,T] logprobs (grad) -> (scalar loss share, metrics): CoT term, supervised term, KL."""
    per_token = jepo_loss(logprobs, terms.advantages, terms.mask, terms.answer_mask,
                          terms.answer_weight, beta_sup=cfg.beta_sup)
    return finish_loss(cfg, per_token, logprobs, terms, denominators, entropy)


def _valid_ell(answer_logprob_sums: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """[P,G] ell, valid -> (ell in float64 with invalid entries set to 0, bool valid).

    Invalid samples may carry anything (often -inf: no answer tokens were scored); only the
    valid ones must be finite.
    """
    if not isinstance(answer_logprob_sums, Tensor) or answer_logprob_sums.dim() != 2:
        raise ValueError("answer_logprob_sums must be a 2-D [P, G] tensor of per-sample sums "
                         "of answer-token log-probs")
    check_same_shape(valid, "valid", answer_logprob_sums, "answer_logprob_sums")
    keep = valid.bool()
    x = torch.where(keep, answer_logprob_sums.double(), 0.0)
    check_rewards(x, "answer_logprob_sums (valid entries)")
    return x, keep
