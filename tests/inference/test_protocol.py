"""The SGLang wire format shared by client and stand-in, and the weight-stream shapes."""

from __future__ import annotations

import pytest
import torch

from inference.engine import Completion, SamplingParams, row_seed
from inference.protocol import (
    ProtocolError,
    completion_from_wire,
    completion_to_wire,
    decode_bucket_safetensors,
    encode_bucket_safetensors,
    generate_request,
    parse_weight_version,
    sampling_from_wire,
)
from inference.weight_stream import iter_buckets, iter_safetensors_dir, save_stream_to_dir


def test_generate_request_has_sglang_shape():
    sp = SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=40, stop=["\n\n"], stop_token_ids=[2])
    body = generate_request([1, 2, 3], sp, seed=77, rid="r-1")
    assert body == {
        "input_ids": [1, 2, 3], "rid": "r-1", "return_logprob": True,
        "sampling_params": {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "ignore_eos": False,
                            "no_stop_trim": True, "stop": ["\n\n"], "stop_token_ids": [2], "sampling_seed": 77},
    }


def test_sampling_round_trips_through_the_wire():
    sp = SamplingParams(max_new_tokens=9, temperature=0.0, top_k=5, stop=["x"], stop_token_ids=[3, 4], ignore_eos=True)
    back, seed = sampling_from_wire(generate_request([1], sp, 5, "r")["sampling_params"])
    assert back == sp and seed == 5


def test_sglang_spellings_of_defaults_are_understood():
    sp, seed = sampling_from_wire({"top_k": 1 << 30, "temperature": None, "stop": "END", "skip_special_tokens": False})
    assert (sp.top_k, sp.temperature, sp.stop, seed) == (-1, 1.0, ("END",), None)


@pytest.mark.parametrize("field,value", [("min_p", 0.1), ("repetition_penalty", 1.2), ("regex", "a+"), ("n", 4)])
def test_options_that_change_the_distribution_are_refused_by_name(field, value):
    with pytest.raises(ProtocolError, match=f"sampling_params.{field}"):
        sampling_from_wire({field: value})


def test_invalid_values_are_refused_naming_the_wire_field():
    with pytest.raises(ProtocolError, match="sampling_params.top_p"):
        sampling_from_wire({"top_p": 0.0})


def test_completion_round_trips_through_the_wire():
    c = Completion([5, 9, 2], [-0.1, -2.5, -0.01], "stop", 3, matched_stop=2)
    wire = completion_to_wire(c, rid="r", prompt_tokens=4, text="ab")
    assert wire["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    assert wire["meta_info"]["output_token_logprobs"][1] == [-2.5, 9, None]
    assert completion_from_wire(wire, "w0") == c


def test_a_response_without_logprobs_names_the_server_and_the_fix():
    wire = completion_to_wire(Completion([1], [-1.0], "length", 0), rid="r", prompt_tokens=1, text="")
    del wire["meta_info"]["output_token_logprobs"]
    with pytest.raises(ProtocolError, match="w3: meta_info.output_token_logprobs missing.*return_logprob"):
        completion_from_wire(wire, "w3")


def test_weight_versions():
    assert [parse_weight_version(v) for v in ("default", None, "12", 4)] == [0, 0, 12, 4]
    with pytest.raises(ProtocolError, match="--weight-version"):
        parse_weight_version("v1.2")


def test_safetensors_payload_round_trips_and_refuses_garbage():
    bucket = [("a.weight", torch.randn(3, 4).t()), ("b", torch.arange(5, dtype=torch.bfloat16))]
    back = decode_bucket_safetensors(encode_bucket_safetensors(bucket))
    assert sorted(n for n, _ in back) == ["a.weight", "b"]
    assert all(torch.equal(dict(back)[n], t) and dict(back)[n].dtype == t.dtype for n, t in bucket)
    with pytest.raises(ProtocolError, match="not base64 safetensors"):
        decode_bucket_safetensors("!!not base64!!")


def test_row_seeds_are_distinct_and_stable():
    seeds = {row_seed(7, p, i) for p in range(50) for i in range(16)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(7, 3, 2) == row_seed(7, 3, 2) != row_seed(8, 3, 2)


def test_iter_buckets_accepts_pairs_buckets_and_state_dicts():
    t = {f"w{i}": torch.zeros(10) for i in range(5)}  # 40 bytes each
    assert [[n for n, _ in b] for b in iter_buckets(iter(t.items()), bucket_bytes=100)] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    assert [[n for n, _ in b] for b in iter_buckets(t, bucket_bytes=10)] == [["w0"], ["w1"], ["w2"], ["w3"], ["w4"]]
    buckets = [{"w0": t["w0"]}, [("w1", t["w1"]), ("w2", t["w2"])]]
    assert [[n for n, _ in b] for b in iter_buckets(iter(buckets), bucket_bytes=1)] == [["w0"], ["w1", "w2"]]


def test_iter_buckets_refuses_what_is_not_a_weight_stream():
    with pytest.raises(TypeError, match="item 1 is a Tensor"):
        list(iter_buckets([("a", torch.zeros(1)), torch.zeros(1)]))
    with pytest.raises(TypeError, match=r"item 0 holds str"):
        list(iter_buckets([["a", "b"]]))


def test_stream_to_disk_and_back(tmp_path):
    state = {f"w{i}": torch.full((10,), float(i)) for i in range(5)}
    assert save_stream_to_dir(state, tmp_path, bucket_bytes=100) == 5
    back = dict(pair for bucket in iter_safetensors_dir(tmp_path) for pair in bucket)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
