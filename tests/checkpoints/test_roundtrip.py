"""HF -> Megatron (TP=2, through the converter's main) -> HF (TP=1) is bit-exact for every
family — untied (llama), tied + QKV bias (qwen2), QK-norm + head_dim != hidden/heads (qwen3),
and a bf16 checkpoint — with a vocabulary (300) that Megatron pads differently per TP."""

import filecmp
import json
import os

import pytest
import torch

from .conftest import section
from .jobs import tokens
from .tiny_models import hf_logits, read_state_dict

CASES = {"llama": "family:llama", "qwen2": "family:qwen2", "qwen3": "family:qwen3",
         "llama-bf16": "bf16"}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_megatron_hf_is_bit_exact(checks, hf_dirs, case):
    back = section(checks, CASES[case])["back_dir"]
    original, converted = read_state_dict(hf_dirs[case]), read_state_dict(back)
    assert sorted(converted) == sorted(original)
    for name, t in original.items():
        assert converted[name].dtype == t.dtype, name
        assert torch.equal(converted[name], t), name


@pytest.mark.parametrize("case", list(CASES))
def test_output_is_a_complete_hf_model_dir(checks, hf_dirs, case):
    back = section(checks, CASES[case])["back_dir"]
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert filecmp.cmp(os.path.join(hf_dirs[case], name), os.path.join(back, name),
                           shallow=False), name
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                      for k in range(1, len(shards) + 1)]
    assert sorted(n for n in os.listdir(back) if n.endswith(".safetensors")) == shards
    assert not [n for n in os.listdir(os.path.dirname(back)) if ".tmp-" in n]
    with open(os.path.join(back, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(hf_dirs[case], "config.json")) as f:
        orig = json.load(f)
    assert cfg == orig
    assert cfg["dtype"] == ("bfloat16" if case.endswith("bf16") else "float32")


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_output_loads_in_transformers_unchanged(checks, hf_dirs, case):
    back = section(checks, CASES[case])["back_dir"]
    toks = tokens()
    assert torch.equal(hf_logits(back, toks), hf_logits(hf_dirs[case], toks))
