"""SPRO: cumulative self-guided process reward and the masked step advantage (spec 6, 8)."""

import torch

from pipeline.algorithms import grpo_advantages, spro_advantages, spro_advantages_packed


def _advantages(rewards, log_ratios, beta):
    """Rewards [P,G] and ragged per-response log-ratios old - ref -> [B,T] SPRO advantages."""
    width = max(len(y) for y in log_ratios)
    mask = torch.tensor([[t < len(y) for t in range(width)] for y in log_ratios])
    old = torch.tensor([list(y) + [0.0] * (width - len(y)) for y in log_ratios],
                       dtype=torch.float64)
    return spro_advantages(torch.tensor(rewards), old, torch.zeros_like(old), mask, beta=beta)


def test_two_response_worked_example():
    adv = _advantages([[1.0, 0.0]], [[0.2, -0.1, 0.3], [-0.2, 0.1, 0.0]], beta=1.0)
    y1 = torch.tensor([0.907107, 0.807107, 0.957107])
    torch.testing.assert_close(adv, torch.stack([y1, -y1]), atol=1e-5, rtol=0)


def test_ragged_worked_example():
    adv = _advantages([[1.0, 0.0, 1.0]], [[0.4, -0.2, 0.6, 1.0], [-0.4, 0.2], [0.0, 0.0, -0.6]],
                      beta=0.5)
    expected = torch.tensor([[0.777350, 0.677350, 0.927350, 0.577350],
                             [-1.354701, -1.254701, 0.0, 0.0],
                             [0.577350, 0.577350, 0.227350, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def _random_step(p=3, g=4, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (p, g), generator=gen).double()
    mask = torch.arange(t) < torch.randint(1, t + 1, (p * g, 1), generator=gen)
    old = -torch.rand(p * g, t, generator=gen, dtype=torch.float64)
    ref = -torch.rand(p * g, t, generator=gen, dtype=torch.float64)
    return rewards, old, ref, mask


def test_step_advantage_columns_sum_to_zero_over_active_rows():
    rewards, old, ref, mask = _random_step()
    msa = spro_advantages(rewards, old, ref, mask, beta=0.5) - \
        spro_advantages(rewards, old, ref, mask, beta=0.0)
    torch.testing.assert_close(msa.view(3, 4, 6).sum(dim=1), torch.zeros(3, 6, dtype=torch.float64))


def test_beta_zero_is_exactly_grpo_on_every_valid_token():
    rewards, old, ref, mask = _random_step()
    adv = spro_advantages(rewards, old, ref, mask, beta=0.0)
    grpo = grpo_advantages(rewards).reshape(-1, 1).expand_as(adv)
    assert torch.equal(adv, torch.where(mask, grpo, 0.0))


def test_groups_with_agreeing_outcomes_still_get_token_signal():
    rewards, old, ref, mask = _random_step()
    rewards[:] = 1.0
    adv = spro_advantages(rewards, old, ref, mask)
    assert adv.abs().sum() > 0
    assert torch.isfinite(adv).all()


def test_msa_std_option_normalises_each_column():
    adv = _advantages([[1.0, 1.0]], [[0.2, 0.1], [-0.2, 0.3]], beta=1.0)
    scaled = spro_advantages(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.2, 0.1], [-0.2, 0.3]]),
                             torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), beta=1.0,
                             msa_std=True)
    # two active values +-d: unbiased std sqrt(2) d -> +-1/sqrt(2)
    torch.testing.assert_close(scaled.abs(), torch.full((2, 2), 2 ** -0.5), atol=1e-5, rtol=0)
    assert torch.equal(scaled.sign(), adv.sign())


def test_packed_layout_matches_the_padded_one():
    rewards, old, ref, mask = _random_step()
    padded = spro_advantages(rewards, old, ref, mask, beta=0.3)
    # Pack each sequence as 2 prompt tokens (masked out) followed by its response.
    lengths = mask.sum(dim=1)
    pieces_old, pieces_ref, pieces_mask = [], [], []
    for row, n in enumerate(lengths.tolist()):
        pieces_old += [torch.tensor([9.0, 9.0], dtype=torch.float64), old[row, :n]]
        pieces_ref += [torch.tensor([-9.0, -9.0], dtype=torch.float64), ref[row, :n]]
        pieces_mask += [torch.zeros(2, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), (lengths + 2).cumsum(0)])
    packed = spro_advantages_packed(rewards, torch.cat(pieces_old), torch.cat(pieces_ref), cu,
                                    mask=torch.cat(pieces_mask), beta=0.3)
    packed_mask = torch.cat(pieces_mask)
    torch.testing.assert_close(packed[packed_mask], padded[mask])
    assert torch.equal(packed[~packed_mask], torch.zeros(int((~packed_mask).sum()),
                                                          dtype=packed.dtype))
