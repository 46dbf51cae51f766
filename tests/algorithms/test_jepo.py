"""JEPO: leave-one-out bound advantages, normalisation, formatting penalty, the supervised
term and sequence construction (spec sections 5 and 8)."""

import math

import pytest
import torch

from pipeline.algorithms import (aggregate, build_jepo_sequence, delimiter_cut, jepo_advantages,
                                 jepo_answer_weights, jepo_bound, jepo_format_advantages,
                                 jepo_loss, jepo_normalize, pad_jepo_sequences)

ELL = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
ALL = torch.ones(1, 4, dtype=torch.bool)


def test_single_sample_worked_example():
    torch.testing.assert_close(jepo_advantages(ELL, ALL, multi_sample=False),
                               torch.tensor([[2.0, 0.666667, -0.666667, -2.0]]), atol=1e-5,
                               rtol=0)


def test_multi_sample_worked_example():
    torch.testing.assert_close(jepo_advantages(ELL, ALL),
                               torch.tensor([[0.744902, -0.017338, -0.196505, -0.255098]]),
                               atol=1e-5, rtol=0)


def test_softmax_weights_worked_example():
    torch.testing.assert_close(jepo_answer_weights(ELL, ALL),
                               torch.tensor([[0.643914, 0.236883, 0.087144, 0.032059]]),
                               atol=1e-5, rtol=0)


def test_normalised_multi_sample_worked_example():
    adv = jepo_normalize(jepo_advantages(ELL, ALL), ALL)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -0.043352, -0.491327, -0.637831]]),
                               atol=1e-5, rtol=0)


def test_single_sample_advantages_sum_to_zero():
    ell = -torch.rand(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 9
    adv = jepo_advantages(ell, torch.ones(5, 6, dtype=torch.bool), multi_sample=False)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(5, dtype=torch.float64))


def test_all_equal_likelihoods_give_zero():
    adv = jepo_advantages(torch.full((2, 4), -3.0), torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(adv, torch.zeros(2, 4))
    assert torch.equal(jepo_normalize(adv, torch.ones(2, 4, dtype=torch.bool)), adv)


def test_invalid_samples_are_excluded_from_the_bound():
    ell = torch.tensor([[-1.0, -math.inf, -2.0, -3.0, -4.0]])
    valid = torch.tensor([[True, False, True, True, True]])
    adv = jepo_advantages(ell, valid)
    torch.testing.assert_close(adv[:, [0, 2, 3, 4]], jepo_advantages(ELL, ALL))
    assert adv[0, 1].item() == 0.0


def test_all_invalid_group_is_zero_without_nan():
    ell = torch.tensor([[-math.inf, float("nan")], [-1.0, -2.0]])
    valid = torch.tensor([[False, False], [True, True]])
    for out in (jepo_advantages(ell, valid), jepo_answer_weights(ell, valid),
                jepo_normalize(jepo_advantages(ell, valid), valid)):
        assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(2))
    assert jepo_bound(ell, valid)[0].item() == 0.0


@pytest.mark.parametrize("mode, expected", [("raw", -2.5), ("zero", 0.0)])
def test_a_single_valid_sample_gets_its_likelihood_or_zero(mode, expected):
    adv = jepo_advantages(torch.tensor([[-2.5, -1.0]]), torch.tensor([[True, False]]),
                          n1_mode=mode)
    assert adv.tolist() == [[expected, 0.0]]


def test_normalisation_uses_the_population_std_of_valid_samples_and_clips():
    adv = torch.tensor([[3.0, -1.0, 100.0]])
    valid = torch.tensor([[True, True, False]])
    # valid [3, -1]: population std 2 -> [1.5, -0.5] -> clip -> [1, -0.5]
    torch.testing.assert_close(jepo_normalize(adv, valid), torch.tensor([[1.0, -0.5, 0.0]]))


def test_formatting_penalty_has_an_rloo_baseline_and_the_same_normalisation():
    adv = jepo_format_advantages(torch.tensor([[True, True, True, False]]))
    # rewards [0,0,0,-10] -> RLOO [10/3]*3 + [-10] -> / population std 5.7735 -> clip
    torch.testing.assert_close(adv, torch.tensor([[0.577350, 0.577350, 0.577350, -1.0]]),
                               atol=1e-5, rtol=0)
    assert torch.equal(jepo_format_advantages(torch.ones(2, 3, dtype=torch.bool)),
                       torch.zeros(2, 3))


def test_bound_is_logsumexp_minus_log_n():
    expected = torch.logsumexp(ELL, dim=1) - math.log(4)
    torch.testing.assert_close(jepo_bound(ELL, ALL), expected)


def test_supervised_term_has_the_gradient_of_the_bound():
    gen = torch.Generator().manual_seed(0)
    p, n, t = 2, 3, 4
    answer = torch.arange(t) >= torch.randint(1, t, (p * n, 1), generator=gen)
    logp = (-torch.rand(p * n, t, generator=gen, dtype=torch.float64)).requires_grad_()
    ell = (logp * answer).sum(dim=1).view(p, n)
    valid = torch.ones(p, n, dtype=torch.bool)
    weights = n * jepo_answer_weights(ell.detach(), valid).reshape(-1)
    per_token = jepo_loss(logp, torch.zeros(p * n, dtype=torch.float64),
                          torch.zeros_like(answer), answer, weights)
    ours = aggregate(per_token, answer, "seq-mean-token-sum", num_seqs=p * n)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    (grad_bound,) = torch.autograd.grad(-jepo_bound(ell, valid).mean(), logp)
    torch.testing.assert_close(grad_ours, grad_bound)


def test_cot_term_is_the_mean_over_samples_of_advantage_weighted_sums():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    cot = torch.tensor([[True, True], [True, False]])
    per_token = jepo_loss(logp, torch.tensor([0.5, -1.0]), cot, torch.zeros_like(cot),
                          torch.zeros(2))
    loss = aggregate(per_token, cot, "seq-mean-token-sum")
    assert loss.item() == pytest.approx((0.5 * 3 + -1.0 * 3) / 2)


# A toy tokenizer: token id i decodes to PIECES[i].
PIECES = ["Let", " x", " The", " FINAL", " answer", " is", " 42", ".", "The fin", "al answer i",
          "s: 4", "2", "<eos>"]


def _decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_cut_is_the_shortest_prefix_containing_the_delimiter_case_insensitively():
    assert delimiter_cut([0, 1, 2, 3, 4, 5, 6, 7], _decode) == 6


def test_a_delimiter_ending_inside_a_token_keeps_that_token():
    assert delimiter_cut([8, 9, 10, 11], _decode) == 3


def test_sequence_is_the_cut_cot_plus_the_reference_answer():
    seq = build_jepo_sequence([0, 2, 3, 4, 5, 6, 7], [6], _decode)
    assert seq.tokens.tolist() == [0, 2, 3, 4, 5, 6]
    assert seq.cot_mask.tolist() == [True] * 5 + [False]
    assert seq.answer_mask.tolist() == [False] * 5 + [True]
    assert seq.valid and seq.formatted


def test_eos_is_appended_to_the_answer_when_asked():
    seq = build_jepo_sequence([2, 3, 4, 5], [6], _decode, eos_id=12)
    assert seq.tokens.tolist() == [2, 3, 4, 5, 6, 12]
    assert seq.answer_mask.tolist() == [False] * 4 + [True, True]


def test_a_response_without_the_delimiter_is_all_cot_and_invalid():
    seq = build_jepo_sequence([0, 1, 7], [6], _decode)
    assert seq.tokens.tolist() == [0, 1, 7]
    assert seq.cot_mask.all() and not seq.answer_mask.any()
    assert not seq.valid and not seq.formatted


def test_an_empty_reference_answer_is_formatted_but_invalid():
    seq = build_jepo_sequence([2, 3, 4, 5, 6], [], _decode)
    assert seq.formatted and not seq.valid and not seq.answer_mask.any()


def test_the_delimiter_is_configurable():
    assert delimiter_cut([0, 1, 7], _decode, delimiter=" X") == 2


def test_padding_stacks_sequences_left_aligned():
    seqs = [build_jepo_sequence([2, 3, 4, 5], [6], _decode),
            build_jepo_sequence([0, 7], [6], _decode)]
    tokens, cot, answer, valid, formatted = pad_jepo_sequences(seqs, pad_id=-1)
    assert tokens.tolist() == [[2, 3, 4, 5, 6], [0, 7, -1, -1, -1]]
    assert cot.tolist()[1] == [True, True, False, False, False]
    assert answer.tolist()[0] == [False] * 4 + [True]
    assert valid.tolist() == [True, False] and formatted.tolist() == [True, False]
