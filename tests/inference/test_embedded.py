"""EmbeddedEngine on a tiny random Llama: shapes, stopping, seeds, log-probs, weight updates, memory."""

from __future__ import annotations

import pytest
import torch

from inference.embedded import EmbeddedEngine, MemoryReleasedError, RowRequest
from inference.engine import SamplingParams
from tests.inference.tiny_model import build_model, tiny_tokenizer

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def engine(model_dir):
    with EmbeddedEngine.from_pretrained(model_dir, max_batch_size=8) as e:
        yield e


def _greedy(engine, prompt, steps=12):
    sp = SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], 1, sp)[0][0].token_ids


def test_generate_returns_prompt_major_groups_of_aligned_tokens_and_logprobs(engine):
    groups = engine.generate(PROMPTS, 4, SamplingParams(max_new_tokens=16, seed=3))
    assert [len(g) for g in groups] == [4, 4, 4]
    for group in groups:
        for c in group:
            assert 1 <= len(c.token_ids) <= 16
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.weight_version == 0
            assert c.finish_reason in ("stop", "length")


def test_max_new_tokens_ends_with_length(engine):
    c = engine.generate([PROMPTS[0]], 2, SamplingParams(max_new_tokens=7, ignore_eos=True, seed=0))[0]
    assert [len(x.token_ids) for x in c] == [7, 7]
    assert {x.finish_reason for x in c} == {"length"}


def test_stop_token_id_ends_the_completion_and_is_kept(engine):
    tokens = _greedy(engine, PROMPTS[1])
    stop = tokens[5]
    first = tokens.index(stop)
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop])
    c = engine.generate([PROMPTS[1]], 1, sp)[0][0]
    assert c.token_ids == tokens[: first + 1]
    assert (c.finish_reason, c.matched_stop) == ("stop", stop)


def test_eos_stops_unless_ignore_eos(engine, model_dir):
    other = EmbeddedEngine.from_pretrained(model_dir)
    tokens = _greedy(other, PROMPTS[2])
    other.eos_token_ids = frozenset({tokens[3]})
    first = tokens.index(tokens[3])
    stopped = other.generate([PROMPTS[2]], 1, SamplingParams(max_new_tokens=12, temperature=0.0))[0][0]
    assert stopped.token_ids == tokens[: first + 1] and stopped.finish_reason == "stop"
    assert _greedy(other, PROMPTS[2]) == tokens


def test_stop_string_is_matched_on_decoded_text(engine):
    tokens = _greedy(engine, PROMPTS[0], steps=16)
    tok = tiny_tokenizer()
    stop = tok.decode(tokens[6:8])
    # The first prefix whose text contains the stop string is where generation must end.
    end = next(k for k in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:k]))
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop])
    c = engine.generate([PROMPTS[0]], 1, sp)[0][0]
    assert c.token_ids == tokens[:end]
    assert (c.finish_reason, c.matched_stop) == ("stop", stop)


def test_stop_string_without_tokenizer_is_refused_naming_the_field(model_dir):
    bare = EmbeddedEngine(build_model(0))
    with pytest.raises(ValueError, match="SamplingParams.stop"):
        bare.generate([PROMPTS[0]], 1, SamplingParams(stop=["x"]))


def test_same_seed_same_samples_and_different_seed_differs(engine):
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True, seed=11)
    a = engine.generate(PROMPTS, 3, sp)
    b = engine.generate(PROMPTS, 3, sp)
    c = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=20, ignore_eos=True, seed=12))
    assert [[x.token_ids for x in g] for g in a] == [[x.token_ids for x in g] for g in b]
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]
    # Samples of one prompt are not copies of each other.
    assert len({tuple(x.token_ids) for x in a[0]}) == 3


def test_a_row_does_not_depend_on_its_batch(model_dir):
    sp = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, ignore_eos=True)
    target = RowRequest(PROMPTS[0], sp, seed=1234)
    others = [RowRequest(p, SamplingParams(max_new_tokens=5, temperature=1.3), seed=s) for s, p in enumerate(PROMPTS)]
    alone = EmbeddedEngine.from_pretrained(model_dir, max_batch_size=1).generate_rows([target])[0]
    mixed = EmbeddedEngine.from_pretrained(model_dir, max_batch_size=4).generate_rows(others + [target])[-1]
    assert mixed.token_ids == alone.token_ids
    assert torch.allclose(torch.tensor(mixed.logprobs), torch.tensor(alone.logprobs), atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 20, 0.9), (1.3, -1, 0.8), (0.0, -1, 1.0)])
def test_logprobs_equal_teacher_forced_recomputation(engine, temperature, top_k, top_p):
    sp = SamplingParams(max_new_tokens=20, temperature=temperature, top_k=top_k, top_p=top_p, seed=5, ignore_eos=True)
    groups = engine.generate(PROMPTS, 2, sp)
    scale = temperature if temperature > 0 else 1.0
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            full = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = engine.model(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
            ref = torch.log_softmax(logits / scale, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5), (c.logprobs, ref.tolist())


def test_update_weights_makes_outputs_equal_a_freshly_loaded_model(model_dir, other_model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir)
    fresh = EmbeddedEngine.from_pretrained(other_model_dir)
    sp = SamplingParams(max_new_tokens=16, ignore_eos=True, seed=9)
    before = engine.generate(PROMPTS, 2, sp)
    trained = build_model(1)
    version = engine.update_weights(((k, v.clone()) for k, v in trained.state_dict().items()), version=7)
    after, expected = engine.generate(PROMPTS, 2, sp), fresh.generate(PROMPTS, 2, sp)
    assert version == 7 and engine.weight_version == 7
    assert all(c.weight_version == 7 for g in after for c in g)
    assert [[c.token_ids for c in g] for g in after] == [[c.token_ids for c in g] for g in expected]
    assert [[c.logprobs for c in g] for g in after] == [[c.logprobs for c in g] for g in expected]
    assert [[c.token_ids for c in g] for g in after] != [[c.token_ids for c in g] for g in before]


def test_update_weights_accepts_buckets_in_another_dtype(model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir)
    state = build_model(1).state_dict()
    names = list(state)
    buckets = [{n: state[n].to(torch.bfloat16) for n in names[:5]}, [(n, state[n].to(torch.bfloat16)) for n in names[5:]]]
    assert engine.update_weights(iter(buckets)) == 1
    for n in names:
        assert torch.equal(engine.named_weights()[n], state[n].to(torch.bfloat16).float())


def test_tied_embeddings_update_through_either_name():
    engine = EmbeddedEngine(build_model(0, "qwen2"))
    trained = build_model(1, "qwen2")
    engine.update_weights([("model.embed_tokens.weight", trained.model.embed_tokens.weight.detach())])
    assert torch.equal(engine.model.lm_head.weight, trained.model.embed_tokens.weight)


def test_unknown_tensor_name_is_refused_naming_it_and_bucket_is_not_applied(model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir)
    before = engine.named_weights()["model.norm.weight"].clone()
    bucket = [("model.norm.weight", torch.zeros(64)), ("model.layers.0.mlp.gate_prj.weight", torch.zeros(128, 64))]
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.gate_prj\.weight.*gate_proj"):
        engine.update_weights([bucket])
    assert torch.equal(engine.named_weights()["model.norm.weight"], before)
    assert engine.weight_version == 0


def test_wrong_shape_is_refused_naming_tensor_and_shapes(engine):
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\).*expects \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(65))])


def test_empty_stream_is_an_error(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.update_weights([])


def test_release_refuses_generation_until_resume_and_keeps_weights(model_dir):
    engine = EmbeddedEngine.from_pretrained(model_dir)
    sp = SamplingParams(max_new_tokens=8, seed=1)
    before = engine.generate(PROMPTS, 1, sp)
    engine.release_memory()
    with pytest.raises(MemoryReleasedError, match="resume_memory"):
        engine.generate(PROMPTS, 1, sp)
    engine.resume_memory()
    assert [[c.token_ids for c in g] for g in engine.generate(PROMPTS, 1, sp)] == [[c.token_ids for c in g] for g in before]


def test_out_of_vocabulary_prompt_is_refused_naming_the_prompt(engine):
    with pytest.raises(ValueError, match="prompt 1 has token ids \\[300\\]"):
        engine.generate([[1, 2], [300]], 1, SamplingParams())
