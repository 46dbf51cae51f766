"""PPO clip, dual clip, GSPO, NLL, KL estimators and TIS weights (spec sections 1 and 8)."""

import math

import pytest
import torch

from pipeline.algorithms import (aggregate, gspo_loss, kl_penalty, nll_loss, ppo_clip_loss,
                                 tis_weights)

ONE = torch.ones(1, 1, dtype=torch.bool)


def _ppo(ratio, adv, **kwargs):
    logp = torch.tensor([[math.log(ratio)]])
    return ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), ONE, **kwargs).item()


def test_ppo_clip_worked_examples():
    assert _ppo(1.5, 1.0) == pytest.approx(-1.2)
    assert _ppo(1.5, 1.0, eps_high=0.28) == pytest.approx(-1.28)
    assert _ppo(5.0, -1.0) == pytest.approx(5.0)
    assert _ppo(5.0, -1.0, dual_clip=3.0) == pytest.approx(3.0)


def test_dual_clip_leaves_positive_advantages_alone():
    assert _ppo(5.0, 1.0, dual_clip=3.0) == pytest.approx(-1.2)


def test_clipped_tokens_get_no_gradient_and_unclipped_ones_do():
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss = ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2).bool())
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1.1]]))


def test_the_log_ratio_is_clamped_so_the_loss_stays_finite():
    logp = torch.tensor([[0.0]])
    loss = ppo_clip_loss(logp, torch.tensor([[-1000.0]]), torch.tensor([-1.0]), ONE)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-6)


def test_padding_is_zero_even_when_it_holds_inf():
    logp = torch.tensor([[-1.0, -math.inf]], requires_grad=True)
    loss = ppo_clip_loss(logp, torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0]),
                         torch.tensor([[True, False]]))
    assert loss[0, 1].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_per_token_advantages_are_accepted():
    logp = torch.zeros(2, 3)
    adv = torch.arange(6.0).view(2, 3)
    loss = ppo_clip_loss(logp, logp, adv, torch.ones(2, 3).bool())
    torch.testing.assert_close(loss, -adv)


def test_kl_worked_examples():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.106531, abs=1e-6)


def test_k3_is_clamped_for_a_far_reference():
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[50.0]])
    assert kl_penalty(logp, ref, "k3").item() == 10.0


def test_gspo_uses_one_ratio_per_sequence():
    logp = torch.tensor([[0.1, 0.3, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss = gspo_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, eps_low=0.9,
                     eps_high=1.0)
    s = math.exp(0.2)  # exp(mean(0.1, 0.3)); the padded 5.0 does not count
    torch.testing.assert_close(loss, torch.tensor([[-s, -s, 0.0]]))


def test_gspo_gradient_equals_the_sequence_level_objective():
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(5) < torch.tensor([[5], [3], [1]])
    old = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    logp = (old + 0.001 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    token = aggregate(gspo_loss(logp, old, adv, mask), mask, "seq-mean-token-mean")
    (grad_token,) = torch.autograd.grad(token, logp)

    lengths = mask.sum(dim=1)
    s = (((logp - old) * mask).sum(dim=1) / lengths).exp()
    seq = torch.maximum(-adv * s, -adv * s.clamp(1 - 3e-4, 1 + 4e-4)).mean()
    (grad_seq,) = torch.autograd.grad(seq, logp)
    torch.testing.assert_close(token, seq)
    torch.testing.assert_close(grad_token, grad_seq)


def test_nll_loss_is_minus_advantage_times_logprob():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 3.0]])
    mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(nll_loss(logp, torch.tensor([2.0, -1.0]), mask),
                               torch.tensor([[2.0, 4.0], [-0.5, 0.0]]))


def test_tis_truncate_caps_the_engine_ratio():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    roll = torch.tensor([[0.0, -0.5, -2.0]])
    w = tis_weights(old, roll, torch.ones(1, 3).bool())
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 2.0]]))


def test_tis_mask_zeroes_tokens_outside_the_band():
    old = torch.zeros(1, 4)
    roll = torch.tensor([[0.0, -0.5, -2.0, 1.0]])  # ratios 1, 1.65, 7.4, 0.37
    w = tis_weights(old, roll, torch.ones(1, 4).bool(), mode="mask")
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), 0.0, 0.0]]))


def test_tis_weights_carry_no_gradient():
    old = torch.zeros(1, 2, requires_grad=True)
    w = tis_weights(old, torch.zeros(1, 2), torch.ones(1, 2).bool())
    assert not w.requires_grad
