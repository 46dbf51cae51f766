"""DAPO dynamic sampling and overlong shaping (spec section 1)."""

import torch

from pipeline.algorithms import informative_groups, overlong_penalty, sample_informative


def test_informative_groups_are_those_with_unequal_rewards():
    r = torch.tensor([[1.0, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.25]])
    assert informative_groups(r).tolist() == [False, True, False, True]


def _draws(batches):
    it = iter(batches)

    def draw():
        rewards, names = next(it)
        return torch.tensor(rewards), names
    return draw


def test_sampling_keeps_drawing_until_the_batch_is_full():
    draw = _draws([([[1.0, 1], [0, 1]], ["a", "b"]),
                   ([[0.0, 0], [1, 0], [0, 1]], ["c", "d", "e"])])
    batch = sample_informative(draw, 2, max_rounds=5)
    assert batch.groups == ["b", "d"] and batch.full and batch.rounds == 2
    assert batch.rewards.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_sampling_stops_after_max_rounds_with_a_short_batch():
    draw = _draws([([[1.0, 1]], ["a"]), ([[0.0, 1]], ["b"]), ([[1.0, 0]], ["c"])])
    batch = sample_informative(draw, 3, max_rounds=2)
    assert batch.groups == ["b"] and not batch.full and batch.rounds == 2


def test_overlong_penalty_is_zero_then_linear_then_minus_one():
    lengths = torch.tensor([10, 12, 14, 16, 17])
    penalty = overlong_penalty(lengths, max_len=16, cache_len=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
