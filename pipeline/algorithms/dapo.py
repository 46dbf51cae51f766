"""DAPO's batch shaping: dynamic sampling and the overlong length penalty (arXiv 2503.14476,
spec section 1). Clip-Higher is :func:`pipeline.algorithms.losses.clipped_objective`'s
``eps_high``; token-mean is an aggregation mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import torch
from torch import Tensor

from pipeline.algorithms.inputs import check_rewards

Item = TypeVar("Item")


def informative_groups(rewards: Tensor) -> Tensor:
    """[P,G] rewards -> BoolTensor[P]: groups whose rewards are not all equal.

    A group with one reward value has zero advantage under every group baseline, so it adds
    tokens to the denominators but no gradient; DAPO drops it (dynamic sampling).
    """
    check_rewards(rewards)
    if rewards.shape[1] == 0:
        return torch.zeros(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    return rewards.amax(dim=1) > rewards.amin(dim=1)


@dataclass
class DynamicBatch(Generic[Item]):
    """The groups dynamic sampling kept, in draw order."""

    groups: list[Item]  # at most num_groups payloads (whatever ``draw`` returned per group)
    rewards: Tensor  # [len(groups), G]
    rounds: int  # how many times ``draw`` was called
    full: bool  # len(groups) == num_groups


def sample_informative(draw: Callable[[], tuple[Tensor, Sequence[Item]]], num_groups: int, *,
                       max_rounds: int) -> DynamicBatch[Item]:
    """Call ``draw() -> (rewards[P,G], P group payloads)`` until ``num_groups`` informative groups
    are kept or ``max_rounds`` draws are spent.

    Extra informative groups of the last draw are dropped. When the rounds run out the batch is
    returned short (``full=False``) rather than padded with degenerate groups, which would
    only dilute the denominators; the caller decides whether a short batch may train.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1; got {max_rounds}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1; got {num_groups}")
    kept: list[Item] = []
    kept_rewards: list[Tensor] = []
    rounds = 0
    while len(kept) < num_groups and rounds < max_rounds:
        rewards, groups = draw()
        rounds += 1
        if len(groups) != rewards.shape[0]:
            raise ValueError(f"draw() returned {rewards.shape[0]} reward rows but "
                             f"{len(groups)} groups")
        keep = informative_groups(rewards)
        for j in torch.nonzero(keep).flatten().tolist()[: num_groups - len(kept)]:
            kept.append(groups[j])
            kept_rewards.append(rewards[j])
    width = kept_rewards[0].shape[0] if kept_rewards else 0
    stacked = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, width)
    return DynamicBatch(groups=kept, rewards=stacked, rounds=rounds,
                        full=len(kept) == num_groups)


def overlong_penalty(lengths: Tensor, *, max_len: int, cache_len: int) -> Tensor:
    """[B] response lengths -> [B] float reward to add (DAPO's soft overlong punishment).

    0 up to ``max_len - cache_len`` tokens, then falls linearly to -1 at ``max_len``, and -1
    beyond: truncated answers are penalised without the cliff of a hard cutoff.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len must be in (0, max_len={max_len}]; got {cache_len}")
    n = lengths.double()
    soft_limit = max_len - cache_len
    ramp = (soft_limit - n) / cache_len
    penalty = torch.where(n <= soft_limit, 0.0, torch.where(n <= max_len, ramp, -1.0))
    return penalty.to(torch.get_default_dtype())
