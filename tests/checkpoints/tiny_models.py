"""Tiny random HF models per family, saved with ``save_pretrained`` (nothing downloaded).

Weights are drawn at unit scale (matrices ~ N(0, 1/fan_in), norms ~ 1 +- 0.2, biases ~ 0.2),
not HF's 0.02 initialisation, so a swapped head, a dropped bias or a misplaced norm moves the
logits by O(1) and cannot hide under the 1e-4 tolerance. The vocabulary (300) is divisible
by neither 128 nor 2 * 128, so Megatron pads it differently at TP=1 and TP=2.
"""

from __future__ import annotations

import json
import os

import torch

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # untied; Llama 3.1 RoPE scaling with a short original context so it changes frequencies
    "llama": dict(COMMON, model_type="llama", tie_word_embeddings=False,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)),
    # tied embeddings + QKV bias
    "qwen2": dict(COMMON, model_type="qwen2", tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # QK-norm, head_dim (32) != hidden / heads (16)
    "qwen3": dict(COMMON, model_type="qwen3", tie_word_embeddings=False, head_dim=32,
                  rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
}


def hf_config(family: str):
    from transformers import AutoConfig

    d = dict(FAMILIES[family])
    return AutoConfig.for_model(d.pop("model_type"), **d)


def make_model(family: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def save_model(model, path: str, max_shard_size: str = "60KB") -> str:
    """save_pretrained (sharded, so the index is exercised) + generation config + tokenizer."""
    from transformers import GenerationConfig

    model.save_pretrained(path, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.7,
                     top_p=0.9).save_pretrained(path)
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits [b, s, V] fp32 of the saved model, through transformers itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF dir's safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            for k, v in load_file(os.path.join(path, name)).items():
                assert k not in out, k
                out[k] = v
    return out


def config_dict(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
