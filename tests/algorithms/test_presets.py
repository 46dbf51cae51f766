"""The preset registry, and every algorithm run end to end through it: estimator, global
denominators, loss, gradient; 1 micro-batch versus 4 (spec section 1, issue 3 "Presets")."""

import pytest
import torch

from pipeline.algorithms import (AapoConfig, CopoConfig, Downsample, GrpoConfig, JepoConfig,
                                 SproConfig, get_preset)
from tests.algorithms.synthetic import CASES, entropy_of, make_step, policy_logprobs

NAMES = ["grpo", "dr_grpo", "rloo", "dapo", "gspo", "pods", "copo", "aapo", "jepo", "spro"]


@pytest.mark.parametrize("name", NAMES)
def test_every_spec_name_is_registered(name):
    assert get_preset(name).name == name


def test_presets_carry_their_paper_defaults():
    assert isinstance(get_preset("grpo").config, GrpoConfig)
    assert get_preset("dr_grpo").config.scale is False
    assert get_preset("dr_grpo").config.aggregation == "seq-mean-token-sum-norm"
    assert get_preset("rloo").config.baseline == "rloo"
    dapo = get_preset("dapo").config
    assert (dapo.eps_low, dapo.eps_high, dapo.aggregation, dapo.dynamic_sampling) == \
        (0.2, 0.28, "token-mean", True)
    gspo = get_preset("gspo").config
    assert (gspo.ratio, gspo.eps_low, gspo.eps_high) == ("sequence", 3e-4, 4e-4)
    assert get_preset("pods").config.downsample == Downsample("max_variance", 16)
    assert get_preset("pods").config.eps == 1e-4
    copo = get_preset("copo").config
    assert isinstance(copo, CopoConfig) and (copo.gamma, copo.rho, copo.dual_clip) == (5, 1, 3)
    assert isinstance(get_preset("aapo").config, AapoConfig)
    jepo = get_preset("jepo").config
    assert isinstance(jepo, JepoConfig) and (jepo.beta_sup, jepo.kl_coef) == (1.0, 1e-3)
    spro = get_preset("spro").config
    assert isinstance(spro, SproConfig) and (spro.beta, spro.kl_coef) == (0.05, 0.0)


def test_fields_can_be_overridden():
    cfg = get_preset("copo", gamma=20.0, rho=1.5).config
    assert (cfg.gamma, cfg.rho, cfg.zero_mask) == (20.0, 1.5, "response")


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'.*grpo, dr_grpo, rloo"):
        get_preset("ppo")


def test_an_unknown_field_is_named():
    with pytest.raises(ValueError, match="copo has no field gama"):
        get_preset("copo", gama=20.0)


def test_an_invalid_value_names_the_field():
    with pytest.raises(ValueError, match="aggregation must be one of"):
        get_preset("grpo", aggregation="mean")


def test_gspo_refuses_an_aggregation_that_breaks_its_gradient():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        get_preset("gspo", aggregation="token-mean")


def test_pods_composes_with_any_algorithm():
    rewards = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 1]])
    for downsample in ("max_variance", {"keep": 4}, Downsample(keep=4)):
        algo = get_preset("copo", downsample=downsample)
        assert algo.select(rewards.repeat(1, 3)).shape == (1, algo.config.downsample.keep)
    assert get_preset("copo").select(rewards) is None
    assert get_preset("pods", downsample={"keep": 4}).select(rewards).tolist() == [[1, 2, 3, 7]]


def test_a_missing_input_is_named_with_what_it_is():
    step = make_step()
    step.answer_ids = None
    with pytest.raises(ValueError, match="copo needs StepBatch.answer_ids"):
        get_preset("copo").advantages(step)


def test_kl_without_reference_logprobs_is_refused():
    step = make_step()
    step.ref_logprobs = None
    algo = get_preset("grpo")
    terms = algo.advantages(step)
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.loss(policy_logprobs(make_step()), terms, algo.denominators(terms))


def _case_id(case):
    name, overrides = case
    return name + "".join(f"-{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_four_micro_batches_give_the_loss_and_gradient_of_one(case):
    name, overrides = case
    step = make_step()
    logp = policy_logprobs(step)
    algo = get_preset(name, **overrides)
    terms = algo.advantages(step)
    denom = algo.denominators(terms)

    whole, metrics = algo.loss(logp, terms, denom, entropy=entropy_of(logp))
    (grad_whole,) = torch.autograd.grad(whole, logp)
    assert torch.isfinite(whole) and torch.isfinite(grad_whole).all()
    assert grad_whole.abs().sum() > 0
    assert set(metrics) >= {"pg_loss", "loss"}

    total = 0.0
    for rows in (slice(0, 5), slice(5, 6), slice(6, 15), slice(15, 24)):
        width = int(terms.loss_mask[rows].sum(dim=1).max())  # trim padding, as packing does
        part = logp[rows][:, :width]
        loss, _ = algo.loss(part, terms.rows(rows, width), denom, entropy=entropy_of(part))
        total = total + loss
    (grad_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(grad_split, grad_whole)


def _degenerate_steps():
    single = make_step(prompts=1, group=1)  # one prompt, a group of one
    empty = make_step(prompts=2, group=3)
    empty.mask[:] = False
    empty.answer_mask[:] = False
    equal = make_step(prompts=2, group=3)
    equal.rewards[:] = 1.0
    equal.ref_rewards[:] = 1.0
    equal.valid[:] = False  # and every JEPO group invalid
    return {"one prompt, group of one": single, "empty masks": empty,
            "all-equal rewards, all-invalid JEPO": equal}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_degenerate_steps_give_finite_losses_and_gradients(case):
    name, overrides = case
    algo = get_preset(name, **overrides)
    for label, step in _degenerate_steps().items():
        logp = policy_logprobs(step)
        terms = algo.advantages(step)
        loss, _ = algo.loss(logp, terms, algo.denominators(terms), entropy=entropy_of(logp))
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), label


def test_tis_weighs_only_sampled_tokens_not_jepo_answer_tokens():
    step = make_step()
    logp = policy_logprobs(step)
    grads = []
    for tis in (None, "truncate"):
        algo = get_preset("jepo", tis=tis, kl_coef=0.0)
        terms = algo.advantages(step)
        loss, _ = algo.loss(logp, terms, algo.denominators(terms))
        grads.append(torch.autograd.grad(loss, logp)[0])
    answer = step.answer_mask
    torch.testing.assert_close(grads[1][answer], grads[0][answer])
    assert not torch.allclose(grads[1][step.mask], grads[0][step.mask])
