"""COPO: consistency entropy, global advantage, gated local weight, loss-level blend
(spec sections 3 and 8)."""

import math

import pytest
import torch

from pipeline.algorithms import (aggregate, consistency_entropy, copo_advantages, copo_loss,
                                 ppo_clip_loss)

REWARDS = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]])
ANSWERS = torch.tensor([[5, 5, 5, 5], [2, 3, 2, 7], [4, 6, 4, 9], [8, 8, 8, 3]])


def test_consistency_entropy_worked_example():
    torch.testing.assert_close(consistency_entropy(ANSWERS),
                               torch.tensor([0.0, 1.5, 1.5, 0.811278], dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_global_advantage_worked_example():
    _, global_, _ = copo_advantages(REWARDS, ANSWERS)
    expected = torch.tensor([1.024693, -1.317462, -0.146385, 0.439154])
    torch.testing.assert_close(global_, expected.unsqueeze(1).expand(4, 4), atol=1e-5, rtol=0)


def test_local_advantage_worked_example():
    local, _, _ = copo_advantages(REWARDS, ANSWERS)
    torch.testing.assert_close(local[2], torch.tensor([0.866024, -0.866024, 0.866024, -0.866024]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(local[3], torch.tensor([0.499999, 0.499999, 0.499999, -1.499997]),
                               atol=1e-5, rtol=0)
    assert torch.equal(local[:2], torch.zeros(2, 4))


def test_local_weight_worked_example():
    _, _, weight = copo_advantages(REWARDS, ANSWERS)
    expected = torch.tensor([[0.006693] * 4, [0.0] * 4, [0.924142, 0, 0.924142, 0],
                             [0.280172] * 3 + [0.0]])
    torch.testing.assert_close(weight, expected, atol=1e-5, rtol=0)


def test_group_zero_mask_keeps_the_weight_where_the_local_advantage_is_nonzero():
    _, _, weight = copo_advantages(REWARDS, ANSWERS, zero_mask="group")
    assert torch.equal(weight[0], torch.zeros(4)) and torch.equal(weight[1], torch.zeros(4))
    assert (weight[2:] > 0).all()


def test_no_zero_mask_keeps_the_gate_everywhere():
    _, _, weight = copo_advantages(REWARDS, ANSWERS, zero_mask="none")
    torch.testing.assert_close(weight[1], torch.full((4,), 0.924142), atol=1e-5, rtol=0)


def test_consistency_scaled_reward_discounts_diverse_groups():
    # lambda_4 = (3/4)/2 = 3/8; R = mean r * (1 - 3/8 H) = [1, 0, 0.5*(7/16), 0.75*(1-0.304229)]
    _, global_, _ = copo_advantages(REWARDS, ANSWERS, consistency_reward=True)
    scaled = torch.tensor([1.0, 0.0, 0.21875, 0.75 * (1 - 0.375 * 0.811278)])
    expected = (scaled - scaled.mean()) / (scaled.std() + 1e-6)
    torch.testing.assert_close(global_[:, 0], expected, atol=1e-5, rtol=0)


def test_one_prompt_in_the_step_has_zero_global_advantage():
    _, global_, _ = copo_advantages(REWARDS[2:3], ANSWERS[2:3])
    assert torch.equal(global_, torch.zeros(1, 4))


def test_equal_prompt_rewards_give_zero_global_advantage():
    r = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    _, global_, _ = copo_advantages(r, ANSWERS[:2])
    torch.testing.assert_close(global_, torch.zeros(2, 4), atol=1e-9, rtol=0)


def test_an_all_wrong_batch_has_exactly_zero_loss():
    r = torch.zeros(2, 4)
    local, global_, weight = copo_advantages(r, ANSWERS[:2])
    logp = torch.randn(8, 3, requires_grad=True)
    loss = copo_loss(logp, logp.detach() - 0.3, local.reshape(-1), global_.reshape(-1),
                     weight.reshape(-1), torch.ones(8, 3).bool())
    assert aggregate(loss, torch.ones(8, 3).bool(), "seq-mean-token-mean").item() == 0.0


LOGP = torch.tensor([[-1.0, -0.5]])
OLD = torch.tensor([[-1.2, -0.5]])
MASK = torch.ones(1, 2, dtype=torch.bool)


def test_loss_blend_worked_example():
    loss = copo_loss(LOGP, OLD, torch.tensor([0.866025]), torch.tensor([-0.5]),
                     torch.tensor([0.6]), MASK, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[-0.379257, -0.319615]]), atol=1e-5, rtol=0)
    assert aggregate(loss, MASK, "seq-mean-token-mean").item() == pytest.approx(-0.349436,
                                                                                abs=1e-5)


def test_blending_losses_differs_from_blending_advantages_once_clipped():
    blended_adv = torch.tensor([0.6 * 0.866025 + 0.4 * -0.5])
    wrong = aggregate(ppo_clip_loss(LOGP, OLD, blended_adv, MASK, dual_clip=3.0), MASK,
                      "seq-mean-token-mean")
    right = aggregate(copo_loss(LOGP, OLD, torch.tensor([0.866025]), torch.tensor([-0.5]),
                                torch.tensor([0.6]), MASK), MASK, "seq-mean-token-mean")
    assert wrong.item() == pytest.approx(-0.351577, abs=1e-5)
    assert abs(wrong.item() - right.item()) > 1e-3
    assert math.isclose(right.item(), -0.349436, abs_tol=1e-5)
