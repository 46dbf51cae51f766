"""The two records that flow through an algorithm: a rank's rollout step in, loss terms out.

``StepBatch`` is what the trainer knows after rewarding (and PODS selection, and the no-grad
forward for old/ref log-probs). An estimator turns it into ``LossTerms``: per-row constants
that the loss needs, which the trainer slices into micro-batches with :meth:`LossTerms.rows`.
Rows are group-major everywhere: row ``j*G + i`` is response i of prompt j.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import Tensor

from pipeline.algorithms.inputs import check_rewards, check_same_shape, check_tokens

# Fields of StepBatch by layout, for validation and for error messages.
_TOKEN_FIELDS = ("old_logprobs", "ref_logprobs", "rollout_logprobs", "answer_mask")
_GROUP_FIELDS = ("answer_ids", "correct", "ref_rewards", "valid", "formatted",
                 "answer_logprob_sums")
_NEEDS = {
    "old_logprobs": "the trainer's no-grad log-probs of the sampled tokens",
    "ref_logprobs": "the frozen reference model's log-probs of the sampled tokens",
    "rollout_logprobs": "the rollout engine's log-probs of the sampled tokens",
    "answer_ids": "the answer class of each response (the reward function returns it)",
    "ref_rewards": "rewards of paired samples from the frozen initial policy",
    "valid": "which samples contain the delimiter and have a non-empty reference answer",
    "answer_mask": "the reference-answer tokens appended to each chain of thought",
}


@dataclass
class StepBatch:
    """One rank's share of a rollout step (whole groups only); every algorithm input.

    JEPO ignores ``rewards`` (pass zeros when the data has no verifier); its ``mask`` marks
    the chain-of-thought tokens and ``answer_mask`` the appended reference answer.
    """

    rewards: Tensor  # [P,G] outcome rewards
    mask: Tensor  # [B,T] tokens the policy loss trains on, left-aligned; B = P*G
    old_logprobs: Tensor | None = None  # [B,T]
    ref_logprobs: Tensor | None = None  # [B,T]
    rollout_logprobs: Tensor | None = None  # [B,T] engine's, for TIS
    answer_ids: Tensor | None = None  # [P,G] COPO answer classes
    correct: Tensor | None = None  # [P,G] COPO; default rewards != 0
    ref_rewards: Tensor | None = None  # [P,G] AAPO
    answer_mask: Tensor | None = None  # [B,T] JEPO reference-answer tokens
    valid: Tensor | None = None  # [P,G] JEPO
    formatted: Tensor | None = None  # [P,G] JEPO delimiter found; default valid
    answer_logprob_sums: Tensor | None = None  # [P,G] JEPO ell; default from old_logprobs

    def __post_init__(self):
        check_rewards(self.rewards)
        p, g = self.rewards.shape
        check_tokens(self.mask, "mask", rows=p * g)
        for name in _TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None:
                check_same_shape(value, name, self.mask, "mask")
        for name in _GROUP_FIELDS:
            value = getattr(self, name)
            if value is not None:
                check_same_shape(value, name, self.rewards, "rewards")
        if self.ref_rewards is not None:
            check_rewards(self.ref_rewards, "ref_rewards")

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    def require(self, algorithm: str, *names: str) -> None:
        """Raise ValueError naming the first of ``names`` that is missing for ``algorithm``."""
        for name in names:
            if getattr(self, name) is None:
                what = _NEEDS.get(name, name)
                raise ValueError(f"{algorithm} needs StepBatch.{name}: {what}")


@dataclass
class LossTerms:
    """Per-row constants of the loss, [B] or [B,T]; no gradient flows through any of them."""

    mask: Tensor  # [B,T] tokens of the policy-gradient, KL and entropy terms
    advantages: Tensor  # [B] or [B,T]; COPO: the local advantage
    old_logprobs: Tensor | None = None  # [B,T]; None: on-policy, ratio 1
    ref_logprobs: Tensor | None = None  # [B,T]
    rollout_logprobs: Tensor | None = None  # [B,T]
    global_advantages: Tensor | None = None  # [B] COPO
    local_weight: Tensor | None = None  # [B] COPO
    answer_mask: Tensor | None = None  # [B,T] JEPO
    answer_weight: Tensor | None = None  # [B] JEPO: G * softmax(ell) within the group

    @property
    def loss_mask(self) -> Tensor:
        """[B,T] every token with a loss term: ``mask``, plus JEPO's answer tokens."""
        mask = self.mask.bool()
        return mask if self.answer_mask is None else mask | self.answer_mask.bool()

    def to(self, device) -> LossTerms:
        """Every field on ``device`` (the logits' device: the loss mixes both)."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None
                                else getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, index, width: int | None = None) -> LossTerms:
        """Rows ``index`` (slice, index tensor or bool mask) of every field, [B,T] fields cut to
        their first ``width`` columns when given: one micro-batch's terms."""
        def cut(value: Tensor | None) -> Tensor | None:
            if value is None:
                return None
            value = value[index]
            return value[:, :width] if width is not None and value.dim() == 2 else value
        return replace(self, **{f.name: cut(getattr(self, f.name)) for f in fields(self)})
