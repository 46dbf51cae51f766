"""PODS: keep m of the n rollouts per prompt before training (arXiv 2504.13818).

Generating is cheap and parallel, updating is memory-bound; PODS samples ``n`` per prompt and
trains on the ``m`` most informative. Order in a step (spec section 2): reward all n ->
select -> old/ref log-probs on the kept rows only -> advantages with group size m
(``grpo_advantages(subset, eps=1e-4)``) -> any loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.algorithms.inputs import check_choice, check_rewards

DOWNSAMPLE_RULES = ("max_variance", "max_reward", "random")
# Variances within this relative distance of the best count as tied (spec section 2).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Downsample:
    """Which m of n rollouts per prompt to train on; composes with every algorithm."""

    rule: str = "max_variance"  # max_variance | max_reward | random
    keep: int = 16  # m; the paper's default ratio is n = 4m (64/16, 32/8)

    def __post_init__(self):
        check_choice(self.rule, "downsample.rule", DOWNSAMPLE_RULES)
        if not isinstance(self.keep, int) or self.keep < 2:
            raise ValueError(f"downsample.keep must be an int >= 2 (variance needs two "
                             f"responses); got {self.keep!r}")


def max_variance_subset(rewards: Tensor, m: int) -> Tensor:
    """[P,n] rewards -> LongTensor[P,m]: columns of the m rewards with the largest variance,
    ascending column order.

    PODS (spec section 2): after an ascending sort, some optimal subset is the k lowest plus the
    m-k highest for a k in 0..m, so only m+1 candidates are scored, each in O(1) from prefix
    sums of r and r^2: O(n log n) per prompt, all prompts at once. Rewards are centred on the
    group mean and summed in float64 so the prefix sums do not cancel. Ties (within
    ``1e-9 * (1 + |var|)``) go to the k closest to m/2, then the smaller k; the sort is stable,
    so equal rewards resolve to the lower column: the choice is deterministic.
    """
    check_rewards(rewards)
    p, n = rewards.shape
    _check_keep(m, n)
    r = rewards.double()
    values, order = torch.sort(r - r.mean(dim=1, keepdim=True), dim=1, stable=True)
    zero = values.new_zeros(p, 1)
    s1 = torch.cat([zero, values.cumsum(dim=1)], dim=1)
    s2 = torch.cat([zero, (values * values).cumsum(dim=1)], dim=1)
    k = torch.arange(m + 1, device=r.device)
    top_start = n - m + k
    sum1 = s1[:, k] + s1[:, n:] - s1[:, top_start]
    sum2 = s2[:, k] + s2[:, n:] - s2[:, top_start]
    var = sum2 / m - (sum1 / m) ** 2
    best = var.max(dim=1, keepdim=True).values
    tied = var >= best - TIE_TOLERANCE * (1.0 + best.abs())
    preference = (2 * k - m).abs() * (m + 1) + k
    chosen = torch.where(tied, preference, preference.max() + 1).argmin(dim=1, keepdim=True)
    slot = torch.arange(m, device=r.device)
    sorted_pos = torch.where(slot < chosen, slot, n - m + slot)
    return order.gather(1, sorted_pos).sort(dim=1).values


def max_reward_subset(rewards: Tensor, m: int) -> Tensor:
    """[P,n] rewards -> LongTensor[P,m]: the m highest rewards (earlier column on ties),
    ascending column order. PODS's ablation: it loses the negative examples."""
    check_rewards(rewards)
    _check_keep(m, rewards.shape[1])
    order = torch.sort(rewards.double(), dim=1, descending=True, stable=True).indices
    return order[:, :m].sort(dim=1).values


def random_subset(rewards: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
    """[P,n] rewards -> LongTensor[P,m]: m columns uniformly without replacement, ascending."""
    check_rewards(rewards)
    p, n = rewards.shape
    _check_keep(m, n)
    noise = torch.rand(p, n, generator=generator, device=rewards.device)
    return noise.argsort(dim=1)[:, :m].sort(dim=1).values


def select_subset(rewards: Tensor, m: int, rule: str = "max_variance",
                  generator: torch.Generator | None = None) -> Tensor:
    """[P,n] rewards -> LongTensor[P,m] kept columns under ``rule`` (see DOWNSAMPLE_RULES)."""
    check_choice(rule, "rule", DOWNSAMPLE_RULES)
    if rule == "max_variance":
        return max_variance_subset(rewards, m)
    if rule == "max_reward":
        return max_reward_subset(rewards, m)
    return random_subset(rewards, m, generator)


def subset_rows(columns: Tensor, n: int) -> Tensor:
    """LongTensor[P,m] kept columns, group size n -> LongTensor[P*m] kept rows of the
    group-major [P*n, T] tensors, still group-major (row ``j*m + i`` of the subset)."""
    if columns.dim() != 2:
        raise ValueError(f"columns must be [P, m]; got shape {tuple(columns.shape)}")
    base = torch.arange(columns.shape[0], device=columns.device).unsqueeze(1) * n
    return (base + columns).reshape(-1)


def _check_keep(m: int, n: int) -> None:
    if not isinstance(m, int) or isinstance(m, bool):
        raise ValueError(f"m must be an int; got {m!r}")
    if m < 2:
        raise ValueError(f"m must be >= 2: a subset of {m} has no variance to maximise")
    if m > n:
        raise ValueError(f"m must be <= n, the rollouts per prompt; got m={m} > n={n}")
