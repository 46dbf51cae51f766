"""vocab_parallel_logprobs_entropy equals a single-process float64 full-vocabulary reference.

The reference is plain autograd on ``log_softmax(logits[:, :vocab_size].double() / T)``;
every comparison is against it, values and gradients of a random weighted sum of both
outputs, at TP=1 (tp_group None or a group of size 1) and TP=2 over gloo.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_ext.logprobs import vocab_parallel_logprobs_entropy
from megatron_ext.multirank import run_ranks

FP32 = dict(atol=1e-6, rtol=1e-6)
# bf16 inputs are exact in fp32, so values keep fp32 accuracy; the gradient is rounded to bf16.
BF16_VALUES = dict(atol=1e-5, rtol=1e-5)
BF16_GRAD = dict(atol=1e-2, rtol=1e-2)


def reference(logits, targets, temperature=1.0, vocab_size=None, w_logp=None, w_ent=None):
    """float64, full vocabulary, plain autograd. Returns (logp, entropy, grad [T, V_padded]);
    the gradient of the padding columns is zero because they never enter the softmax."""
    x = logits.detach().double().requires_grad_()
    vocab_size = vocab_size or x.shape[-1]
    lp = torch.log_softmax(x[:, :vocab_size] / temperature, dim=-1)
    logp = lp.gather(-1, targets[:, None])[:, 0]
    entropy = -(lp.exp() * lp).sum(-1)
    if w_logp is None:
        return logp, entropy, None
    ((logp * w_logp.double()).sum() + (entropy * w_ent.double()).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def ours(logits, targets, w_logp, w_ent, **kwargs):
    x = logits.detach().clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs_entropy(x, targets, **kwargs)
    ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def make_case(seed, tokens, columns, vocab_size=None, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, columns, generator=g) * scale
    targets = torch.randint(0, vocab_size or columns, (tokens,), generator=g)
    w_logp = torch.randn(tokens, generator=g)
    w_ent = torch.randn(tokens, generator=g)
    return logits, targets, w_logp, w_ent


def assert_matches(got, want, values_tol, grad_tol):
    torch.testing.assert_close(got[0].double(), want[0], **values_tol)
    torch.testing.assert_close(got[1].double(), want[1], **values_tol)
    torch.testing.assert_close(got[2].double(), want[2], **grad_tol)


def test_two_token_vocabulary_worked_example():
    # logits [0, ln 3] at temperature 1: p = [1/4, 3/4]; at temperature 0.5: z = [0, 2 ln 3],
    # p = [1/10, 9/10].
    logits = torch.tensor([[0.0, math.log(3.0)]] * 2)
    targets = torch.tensor([1, 0])
    logp, entropy = vocab_parallel_logprobs_entropy(logits, targets, tp_group=None)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75), math.log(0.25)]))
    torch.testing.assert_close(entropy, torch.tensor([h, h]))
    logp, entropy = vocab_parallel_logprobs_entropy(logits, targets, tp_group=None,
                                                    temperature=0.5)
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.9), math.log(0.1)]))
    torch.testing.assert_close(entropy, torch.tensor([h, h]))


@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
def test_single_rank_fp32_matches_float64_reference(chunk_size):
    logits, targets, w_logp, w_ent = make_case(0, tokens=23, columns=301)
    assert_matches(ours(logits, targets, w_logp, w_ent, tp_group=None, chunk_size=chunk_size),
                   reference(logits, targets, 1.0, None, w_logp, w_ent), FP32, FP32)


def test_temperature_divides_fp32_logits_like_the_rollout_engine():
    logits, targets, w_logp, w_ent = make_case(1, tokens=19, columns=257)
    got = ours(logits, targets, w_logp, w_ent, tp_group=None, temperature=0.7, chunk_size=7)
    engine = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got[0], engine, **FP32)
    assert_matches(got, reference(logits, targets, 0.7, None, w_logp, w_ent), FP32, FP32)


def test_padding_columns_carry_no_probability_and_no_gradient():
    # 250 real tokens padded to 256 columns; the padding holds the largest logits, so any
    # leak into the max, the sum or the entropy would show.
    logits, targets, w_logp, w_ent = make_case(2, tokens=17, columns=256, vocab_size=250)
    logits[:, 250:] = 40.0
    got = ours(logits, targets, w_logp, w_ent, tp_group=None, chunk_size=7, vocab_size=250)
    want = reference(logits, targets, 1.0, 250, w_logp, w_ent)
    assert_matches(got, want, FP32, FP32)
    assert torch.equal(got[2][:, 250:], torch.zeros(17, 6))


def test_bf16_input_gives_fp32_values_and_bf16_gradient():
    logits, targets, w_logp, w_ent = make_case(3, tokens=21, columns=300)
    logits = logits.bfloat16()
    got = ours(logits, targets, w_logp, w_ent, tp_group=None, chunk_size=7)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    assert_matches(got, reference(logits, targets, 1.0, None, w_logp, w_ent), BF16_VALUES,
                   BF16_GRAD)


def test_leading_dimensions_are_flattened_into_tokens():
    logits, targets, w_logp, w_ent = make_case(4, tokens=12, columns=50)
    flat = ours(logits, targets, w_logp, w_ent, tp_group=None, chunk_size=5)
    batched = ours(logits.view(3, 4, 50), targets.view(3, 4), w_logp.view(3, 4),
                   w_ent.view(3, 4), tp_group=None, chunk_size=5)
    assert batched[0].shape == batched[1].shape == (3, 4) and batched[2].shape == (3, 4, 50)
    for a, b in zip(flat, batched):
        torch.testing.assert_close(a, b.reshape(a.shape), atol=0, rtol=0)


def test_saves_only_the_input_logits_and_per_token_statistics():
    logits, targets, _, _ = make_case(5, tokens=16, columns=64)
    x = logits.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs_entropy(x, targets, tp_group=None, chunk_size=4)
    big = [t for t in saved if t.numel() > 16]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr() and big[0].dtype == x.dtype
    assert all(t.shape == (16,) for t in saved if t.numel() <= 16)
    assert len(saved) <= 6


def test_input_logits_are_not_modified():
    logits, targets, w_logp, w_ent = make_case(6, tokens=9, columns=40)
    before = logits.clone()
    ours(logits, targets, w_logp, w_ent, tp_group=None, temperature=0.7, chunk_size=2)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(vocab_size=41), "vocab_size"),
])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs_entropy(torch.zeros(3, 40), torch.zeros(3, dtype=torch.long),
                                        tp_group=None, **kwargs)


@pytest.mark.parametrize("bad", [-100, 40])
def test_rejects_targets_outside_the_vocabulary(bad):
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 40\)"):
        vocab_parallel_logprobs_entropy(torch.zeros(3, 40), torch.tensor([0, bad, 1]),
                                        tp_group=None)


# --- TP=2 over gloo: every case in one spawned job (a spawn costs ~5 s) ---------------------

# (name, seed, tokens, padded columns, vocab_size, temperature, chunk_size, dtype)
TP2_CASES = [
    ("fp32 chunk 7, padded 250 -> 256", 10, 23, 256, 250, 1.0, 7, torch.float32),
    ("fp32 chunk 1, padded", 11, 9, 256, 250, 1.0, 1, torch.float32),
    ("fp32 default chunk, unpadded", 12, 23, 256, None, 1.0, None, torch.float32),
    ("fp32 temperature 0.7, chunk 5", 13, 23, 256, 253, 0.7, 5, torch.float32),
    ("fp32 rank 1 all padding", 14, 11, 256, 100, 1.0, 3, torch.float32),
    ("bf16 chunk 7, padded", 15, 23, 256, 250, 1.0, 7, torch.bfloat16),
]


def _tp2_job(rank, world_size, cases):
    """Per case: this rank's (logp, entropy, grad shard) at TP=2, and at TP=1 on a size-1 group."""
    tp_group = dist.new_group([0, 1])
    # every rank must take part in creating every group, even the ones it is not in
    singles = [dist.new_group([r]) for r in range(world_size)]
    out = []
    for logits, targets, w_logp, w_ent, vocab_size, temperature, chunk_size in cases:
        shard = logits.shape[-1] // world_size
        local = logits[:, rank * shard:(rank + 1) * shard]
        kwargs = dict(temperature=temperature, chunk_size=chunk_size, vocab_size=vocab_size)
        tp2 = ours(local, targets, w_logp, w_ent, tp_group=tp_group, **kwargs)
        tp1 = ours(logits, targets, w_logp, w_ent, tp_group=singles[rank], **kwargs)
        out.append((tp2, tp1))
    return out


def test_tp2_matches_float64_reference():
    cases, wants = [], []
    for _, seed, tokens, columns, vocab_size, temperature, chunk, dtype in TP2_CASES:
        logits, targets, w_logp, w_ent = make_case(seed, tokens, columns, vocab_size)
        logits = logits.to(dtype)
        cases.append((logits, targets, w_logp, w_ent, vocab_size, temperature, chunk))
        wants.append(reference(logits, targets, temperature, vocab_size, w_logp, w_ent))

    per_rank = run_ranks(_tp2_job, 2, cases, timeout=120)

    for i, (name, *_, dtype) in enumerate(TP2_CASES):
        (r0, single0), (r1, single1) = per_rank[0][i], per_rank[1][i]
        values_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_VALUES, BF16_GRAD)
        # outputs are replicated: both ranks hold the same per-token values
        assert torch.equal(r0[0], r1[0]) and torch.equal(r0[1], r1[1]), name
        assert r0[2].dtype == dtype, name
        got = (r0[0], r0[1], torch.cat([r0[2], r1[2]], dim=-1))
        try:
            assert_matches(got, wants[i], values_tol, grad_tol)
            assert_matches(single0, wants[i], values_tol, grad_tol)
            assert_matches(single1, wants[i], values_tol, grad_tol)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
