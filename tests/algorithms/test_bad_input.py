"""Inputs a user can get wrong raise a ValueError that names the argument (issue 3, "Bad input")."""

import math

import pytest
import torch

from pipeline.algorithms import (Downsample, StepBatch, aapo_advantages, aggregate,
                                 copo_advantages, grpo_advantages, jepo_advantages, kl_penalty,
                                 max_variance_subset, ppo_clip_loss, rloo_advantages,
                                 spro_advantages)

R = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
X = torch.zeros(4, 3)
M = torch.ones(4, 3, dtype=torch.bool)

CASES = {
    "rewards not 2-D": (lambda: grpo_advantages(torch.ones(4)), "^rewards must be a 2-D"),
    "NaN reward": (lambda: rloo_advantages(torch.tensor([[1.0, math.nan]])),
                   "^rewards contains non-finite"),
    "inf reward": (lambda: max_variance_subset(torch.tensor([[1.0, math.inf, 0.0]]), 2),
                   "^rewards contains non-finite"),
    "m > n": (lambda: max_variance_subset(R, 5), "^m must be <= n"),
    "m < 2": (lambda: max_variance_subset(R, 1), "^m must be >= 2"),
    "ref_rewards shape": (lambda: aapo_advantages(R, torch.ones(1, 3)), "^ref_rewards must have"),
    "NaN ref reward": (lambda: aapo_advantages(R, torch.tensor([[0.0, 0, math.nan, 0]])),
                       "^ref_rewards contains non-finite"),
    "answer_ids shape": (lambda: copo_advantages(R, torch.ones(2, 4)), "^answer_ids must have"),
    "correct shape": (lambda: copo_advantages(R, torch.ones(1, 4), correct=torch.ones(4)),
                      "^correct must have"),
    "spro mask rows": (lambda: spro_advantages(R, X[:3], X[:3], M[:3]), "^mask must have B"),
    "spro old shape": (lambda: spro_advantages(R, X[:, :2], X, M), "^old_logprobs must have"),
    "old_logprobs shape": (lambda: ppo_clip_loss(X, X[:, :2], torch.ones(4), M),
                           "^old_logprobs must have"),
    "advantages shape": (lambda: ppo_clip_loss(X, X, torch.ones(3), M), "^advantages must be"),
    "loss mask shape": (lambda: ppo_clip_loss(X, X, torch.ones(4), M[:, :2]), "^mask must have"),
    "aggregation mode": (lambda: aggregate(X, M, "mean"), "^mode must be one of"),
    "kl kind": (lambda: kl_penalty(X, X, "k4"), "^kind must be one of"),
    "jepo valid shape": (lambda: jepo_advantages(R, torch.ones(1, 3, dtype=torch.bool)),
                         "^valid must have"),
    "step mask rows": (lambda: StepBatch(rewards=R, mask=M[:2]), "^mask must have B"),
    "downsample keep": (lambda: Downsample(keep=1), "^downsample.keep must be"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_raises_value_error_naming_the_argument(case):
    call, message = case
    with pytest.raises(ValueError, match=message):
        call()
