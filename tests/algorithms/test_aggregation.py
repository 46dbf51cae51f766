"""The four aggregation modes and their global denominators (spec sections 1 and 8)."""

import pytest
import torch

from pipeline.algorithms import aggregate, step_denominators

# [[1,2,.,.],[3,4,5,6],[-2,.,.,.]], masked entries hold junk that must not leak in.
LOSSES = torch.tensor([[1.0, 2.0, 99.0, 99.0], [3.0, 4.0, 5.0, 6.0], [-2.0, 99.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 19 / 7),  # 2.714286
    ("seq-mean-token-mean", 4 / 3),  # (1.5 + 4.5 - 2) / 3 = 1.333333
    ("seq-mean-token-sum", 19 / 3),  # 6.333333
    ("seq-mean-token-sum-norm", 19 / 12),  # 19 / (3 sequences * T=4)
])
def test_worked_example(mode, expected):
    assert aggregate(LOSSES, MASK, mode).item() == pytest.approx(expected, abs=1e-6)


def test_sum_norm_uses_the_constant_budget_not_the_batch_width():
    assert aggregate(LOSSES, MASK, "seq-mean-token-sum-norm", max_len=10).item() == \
        pytest.approx(19 / 30)


def test_global_denominators_replace_the_local_counts():
    loss = aggregate(LOSSES, MASK, "token-mean", num_tokens=14)
    assert loss.item() == pytest.approx(19 / 14)
    loss = aggregate(LOSSES, MASK, "seq-mean-token-mean", num_seqs=torch.tensor(6.0))
    assert loss.item() == pytest.approx(4 / 6)


def test_step_denominators_count_valid_tokens_and_non_empty_sequences():
    mask = torch.cat([MASK, torch.zeros(1, 4, dtype=torch.bool)])
    denom = step_denominators(mask)
    assert (denom.num_tokens.item(), denom.num_seqs.item()) == (7, 3)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_an_empty_mask_gives_zero(mode):
    loss = aggregate(LOSSES, torch.zeros_like(MASK), mode)
    assert loss.item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_four_micro_batches_give_the_loss_and_gradient_of_one(mode):
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(9) < torch.randint(0, 10, (11, 1), generator=gen)
    x = torch.randn(11, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    denom = step_denominators(mask)
    kwargs = dict(num_tokens=denom.num_tokens, num_seqs=denom.num_seqs, max_len=9)

    whole = aggregate(x * x, mask, mode, **kwargs)
    (grad_whole,) = torch.autograd.grad(whole, x)
    pieces = [aggregate(x[rows] ** 2, mask[rows], mode, **kwargs)
              for rows in (slice(0, 2), slice(2, 3), slice(3, 8), slice(8, 11))]
    split = sum(pieces)
    (grad_split,) = torch.autograd.grad(split, x)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(grad_split, grad_whole)
