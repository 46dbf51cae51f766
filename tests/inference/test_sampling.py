"""sample_next: the per-row sampling math, against exact expectations."""

import torch

from inference.sampling import sample_next

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def _grid(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def _sample_grid(logits, temperature, top_k, top_p, n=10_000):
    """Sample one row with n evenly spaced uniforms: token frequencies equal the
    sampling distribution to within 1/n."""
    u = _grid(n)
    rows = logits.expand(n, -1)
    tok, lp = sample_next(
        rows, torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.long), torch.full((n,), top_p), u
    )
    return torch.bincount(tok, minlength=logits.shape[-1]).float() / n, tok, lp


def test_frequencies_follow_temperature_scaled_softmax():
    freq, _, _ = _sample_grid(LOGITS, 0.7, 5, 1.0)
    expected = torch.softmax(LOGITS[0] / 0.7, -1)
    assert torch.allclose(freq, expected, atol=2e-4)


def test_top_k_keeps_the_k_most_likely_renormalised():
    freq, _, _ = _sample_grid(LOGITS, 1.0, 2, 1.0)
    p = torch.softmax(LOGITS[0], -1)
    expected = torch.zeros(5)
    expected[[0, 1]] = p[[0, 1]] / p[[0, 1]].sum()
    assert torch.allclose(freq, expected, atol=2e-4)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = torch.softmax(LOGITS[0], -1)  # sorted: 0 (0.50), 1 (0.18), 2 (0.11), 4 (0.07), 3 (0.02)
    top_p = float(p[0] + p[1]) - 1e-3  # needs tokens 0 and 1 to pass p
    freq, _, _ = _sample_grid(LOGITS, 1.0, 5, top_p)
    expected = torch.zeros(5)
    expected[[0, 1]] = p[[0, 1]] / p[[0, 1]].sum()
    assert torch.allclose(freq, expected, atol=2e-4)


def test_tiny_top_p_is_greedy():
    freq, _, _ = _sample_grid(LOGITS, 1.0, 5, 1e-6, n=100)
    assert freq[0] == 1.0


def test_logprobs_are_untruncated_temperature_scaled():
    _, tok, lp = _sample_grid(LOGITS, 0.5, 2, 0.9, n=100)
    expected = torch.log_softmax(LOGITS[0] / 0.5, -1)[tok]
    assert torch.allclose(lp, expected, atol=1e-6)


def test_temperature_zero_is_argmax_with_plain_log_softmax():
    tok, lp = sample_next(LOGITS, torch.zeros(1), torch.tensor([5]), torch.ones(1), torch.tensor([0.99]))
    assert tok.item() == 0
    assert abs(lp.item() - torch.log_softmax(LOGITS[0], -1)[0].item()) < 1e-6


def test_rows_are_independent_of_each_other():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    args = (torch.tensor([1.0, 0.0, 0.8, 1.2]), torch.tensor([50, 50, 3, 10]), torch.tensor([1.0, 1.0, 1.0, 0.8]),
            torch.tensor([0.3, 0.6, 0.9, 0.1]))
    tok, lp = sample_next(logits, *args)
    for r in range(4):
        t, l = sample_next(logits[r : r + 1], *(a[r : r + 1] for a in args))
        assert t.item() == tok[r].item() and l.item() == lp[r].item()
