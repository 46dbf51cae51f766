"""GRPO, Dr. GRPO, RLOO and REINFORCE++-baseline advantages (spec sections 1 and 8)."""

import torch

from pipeline.algorithms import grpo_advantages, reinforce_pp_advantages, rloo_advantages

R = torch.tensor([[1.0, 0.0, 1.0, 1.0]])


def test_grpo_worked_example():
    expected = torch.tensor([[0.499999, -1.499997, 0.499999, 0.499999]])
    torch.testing.assert_close(grpo_advantages(R), expected, atol=1e-5, rtol=0)


def test_dr_grpo_worked_example():
    expected = torch.tensor([[0.25, -0.75, 0.25, 0.25]])
    torch.testing.assert_close(grpo_advantages(R, scale=False), expected, atol=1e-6, rtol=0)


def test_rloo_worked_example():
    expected = torch.tensor([[1 / 3, -1.0, 1 / 3, 1 / 3]])
    torch.testing.assert_close(rloo_advantages(R), expected, atol=1e-6, rtol=0)


def test_rloo_is_reward_minus_mean_of_the_others():
    r = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    others = (r.sum(dim=1, keepdim=True) - r) / 5
    torch.testing.assert_close(rloo_advantages(r), r - others)


def test_group_advantages_sum_to_zero_per_group():
    r = torch.rand(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for adv in (grpo_advantages(r), grpo_advantages(r, scale=False), rloo_advantages(r)):
        torch.testing.assert_close(adv.sum(dim=1), torch.zeros(8, dtype=torch.float64))


def test_advantages_keep_the_reward_dtype():
    assert grpo_advantages(R.to(torch.bfloat16)).dtype == torch.bfloat16
    assert rloo_advantages(R.half()).dtype == torch.float16


def test_groups_of_one_get_zero_not_nan():
    r = torch.tensor([[1.0], [0.0]])
    for adv in (grpo_advantages(r), rloo_advantages(r),
                reinforce_pp_advantages(r, torch.ones(2, 3, dtype=torch.bool))):
        assert torch.equal(adv, torch.zeros_like(adv))


def test_all_equal_rewards_give_zero():
    r = torch.full((3, 4), 0.7)
    assert torch.equal(grpo_advantages(r), torch.zeros(3, 4))
    assert torch.equal(rloo_advantages(r), torch.zeros(3, 4))


def test_reinforce_pp_whitens_over_valid_tokens_and_zeroes_padding():
    gen = torch.Generator().manual_seed(2)
    r = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    mask = torch.arange(6) < torch.randint(1, 7, (12, 1), generator=gen)
    adv = reinforce_pp_advantages(r, mask)
    valid = adv[mask]
    torch.testing.assert_close(valid.mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(valid.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))


def test_reinforce_pp_is_the_group_centred_reward_up_to_an_affine_map():
    r = torch.tensor([[1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    adv = reinforce_pp_advantages(r, torch.ones(4, 2, dtype=torch.bool))
    # centred [.5, -.5, 1, -1] on 2 tokens each: mean 0, unbiased std sqrt(5/7)
    expected = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64) / (5 / 7) ** 0.5
    torch.testing.assert_close(adv[:, 0], expected, atol=1e-7, rtol=0)


def test_reinforce_pp_with_an_empty_mask_is_zero():
    adv = reinforce_pp_advantages(R, torch.zeros(4, 3, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(4, 3))
