"""PODS down-sampling: max-variance (with its tie rule), max-reward, random (spec section 2)."""

import itertools
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.algorithms import (grpo_advantages, max_reward_subset, max_variance_subset,
                                 random_subset, select_subset, subset_rows)


def test_binary_worked_example_keeps_two_of_each():
    r = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 1]])
    cols = max_variance_subset(r, 4)
    assert cols.tolist() == [[1, 2, 3, 7]]  # first two 0s, last two 1s of the stable sort
    adv = grpo_advantages(r.gather(1, cols), eps=1e-4)
    torch.testing.assert_close(adv, torch.tensor([[-0.865875, -0.865875, 0.865875, 0.865875]]),
                               atol=1e-5, rtol=0)


def test_spread_worked_example():
    r = torch.tensor([[0.0, 1, 9, 10, 10, 10]])
    cols = max_variance_subset(r, 3)
    assert cols.tolist() == [[0, 4, 5]]
    kept = r.gather(1, cols)
    assert kept.var(unbiased=False).item() == pytest.approx(22.2222, abs=1e-4)
    torch.testing.assert_close(grpo_advantages(kept, eps=1e-4),
                               torch.tensor([[-1.154681, 0.577340, 0.577340]]), atol=1e-5,
                               rtol=0)


def test_ties_prefer_the_split_closest_to_half():
    # sorted [0,5,5,5,10]: k=1 {0,5,5,10} and k=2 {0,5,5,10} tie; k=2 is m/2.
    assert max_variance_subset(torch.tensor([[0.0, 5, 5, 5, 10]]), 4).tolist() == [[0, 1, 3, 4]]


def test_equidistant_ties_prefer_the_smaller_k():
    # m=3, sorted [0,1,1,2]: k=1 -> cols {0,2,3}, k=2 -> cols {0,1,3}, same variance.
    assert max_variance_subset(torch.tensor([[0.0, 1, 1, 2]]), 3).tolist() == [[0, 2, 3]]


def test_all_equal_rewards_keep_the_lowest_and_highest_columns():
    assert max_variance_subset(torch.ones(1, 6), 4).tolist() == [[0, 1, 4, 5]]


def test_rows_are_selected_independently():
    r = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 1], [5.0, 5, 5, 5, 5, 5, 0, 9]])
    assert max_variance_subset(r, 4).tolist() == [[1, 2, 3, 7], [0, 5, 6, 7]]


def _brute_force_best(values, m):
    return max(statistics.pvariance(c) for c in itertools.combinations(values, m))


REWARD_KINDS = [
    st.sampled_from([0.0, 1.0]),
    st.integers(0, 3).map(float),
    st.floats(-10, 10, allow_nan=False, allow_infinity=False),
]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_max_variance_equals_the_brute_force_optimum(data):
    n = data.draw(st.integers(2, 9), label="n")
    m = data.draw(st.integers(2, n), label="m")
    kind = data.draw(st.sampled_from(REWARD_KINDS), label="kind")
    rows = data.draw(st.lists(st.lists(kind, min_size=n, max_size=n), min_size=1, max_size=3))
    cols = max_variance_subset(torch.tensor(rows, dtype=torch.float64), m)
    for row, kept in zip(rows, cols.tolist()):
        assert len(set(kept)) == m and kept == sorted(kept)
        best = _brute_force_best(row, m)
        got = statistics.pvariance([row[c] for c in kept])
        assert got >= best - 1e-8 * (1 + best)


def test_max_reward_keeps_the_top_m_earlier_first_on_ties():
    r = torch.tensor([[0.5, 1.0, 1.0, 0.0, 1.0]])
    assert max_reward_subset(r, 2).tolist() == [[1, 2]]


def test_random_is_reproducible_with_a_generator_and_distinct():
    r = torch.zeros(3, 10)
    a = random_subset(r, 4, torch.Generator().manual_seed(7))
    b = random_subset(r, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert all(len(set(row)) == 4 for row in a.tolist())


def test_select_subset_dispatches_on_the_rule():
    r = torch.tensor([[0.0, 1, 9, 10, 10, 10]])
    assert torch.equal(select_subset(r, 3, "max_variance"), max_variance_subset(r, 3))
    assert torch.equal(select_subset(r, 3, "max_reward"), max_reward_subset(r, 3))


def test_subset_rows_maps_columns_to_group_major_rows():
    cols = torch.tensor([[0, 3], [1, 2]])
    assert subset_rows(cols, n=4).tolist() == [0, 3, 5, 6]


def test_keeping_every_rollout_is_allowed():
    assert max_variance_subset(torch.tensor([[3.0, 1.0, 2.0]]), 3).tolist() == [[0, 1, 2]]
