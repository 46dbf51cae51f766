"""A synthetic rollout step carrying every field any algorithm reads, and the slicing a
trainer would do: by prompt (DP ranks) and by row (micro-batches)."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from pipeline.algorithms import StepBatch

# StepBatch fields laid out [P,G]; the others are [B,T].
PER_RESPONSE = {"rewards", "answer_ids", "correct", "ref_rewards", "valid", "formatted",
                "answer_logprob_sums"}


def make_step(prompts: int = 6, group: int = 4, width: int = 7, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> StepBatch:
    """A [P,G] step with ragged left-aligned responses; the last tokens of valid rows are the
    JEPO answer, the rest the CoT (the mask)."""
    gen = torch.Generator().manual_seed(seed)
    b = prompts * group
    rewards = torch.randint(0, 2, (prompts, group), generator=gen).to(dtype)
    rewards[0] = 1.0  # one all-correct group: zero local advantage, COPO/AAPO still learn
    lengths = torch.randint(2, width + 1, (b,), generator=gen)
    response = torch.arange(width) < lengths.unsqueeze(1)
    valid = torch.rand(prompts, group, generator=gen) < 0.75
    formatted = valid | (torch.rand(prompts, group, generator=gen) < 0.5)
    answer_len = torch.randint(1, 3, (b,), generator=gen).clamp(max=lengths - 1)
    is_answer = (torch.arange(width) >= (lengths - answer_len).unsqueeze(1)) & response
    is_answer &= valid.reshape(-1, 1)
    old = -torch.rand(b, width, generator=gen, dtype=dtype) * 2
    return StepBatch(
        rewards=rewards,
        mask=response & ~is_answer,
        old_logprobs=old * response,
        ref_logprobs=(old - 0.2 * torch.randn(b, width, generator=gen, dtype=dtype)) * response,
        rollout_logprobs=(old + 0.1 * torch.randn(b, width, generator=gen, dtype=dtype)) * response,
        answer_ids=torch.randint(0, 3, (prompts, group), generator=gen),
        ref_rewards=torch.randint(0, 2, (prompts, group), generator=gen).to(dtype),
        answer_mask=is_answer,
        valid=valid,
        formatted=formatted,
    )


def policy_logprobs(step: StepBatch, seed: int = 1) -> torch.Tensor:
    """[B,T] current-policy log-probs near ``old``, a leaf that requires grad (0 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    old = step.old_logprobs
    noise = 0.3 * torch.randn(old.shape, generator=gen, dtype=old.dtype)
    return ((old + noise) * (step.mask | step.answer_mask)).requires_grad_()


def prompt_slice(step: StepBatch, prompts: slice) -> StepBatch:
    """The StepBatch of prompts ``prompts`` (whole groups, as a DP rank holds them)."""
    g = step.group_size
    rows = slice(prompts.start * g, prompts.stop * g)
    values = {}
    for f in fields(step):
        value = getattr(step, f.name)
        if value is not None:
            values[f.name] = value[prompts] if f.name in PER_RESPONSE else value[rows]
    return replace(step, **values)


# Every preset, with overrides that switch on the optional terms somewhere (TIS, entropy, the
# fixed Dr. GRPO budget = the synthetic width, overlong shaping inside that width).
CASES = [
    ("grpo", dict(tis="truncate", entropy_coef=0.01)),
    ("dr_grpo", dict(max_len=7)),
    ("rloo", dict(tis="mask")),
    ("reinforce_pp", {}),
    ("dapo", dict(overlong_max_len=7, overlong_cache_len=3)),
    ("gspo", {}),
    ("pods", {}),
    ("copo", dict(consistency_reward=True, entropy_coef=0.01)),
    ("aapo", {}),
    ("aapo", dict(ppo_clip=True)),
    ("jepo", {}),
    ("spro", {}),
]


def entropy_of(logprobs: torch.Tensor) -> torch.Tensor:
    """[B,T] -> [B,T] a differentiable stand-in for the policy's token entropy."""
    return 0.5 * logprobs * logprobs
