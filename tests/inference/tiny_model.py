"""Tiny random HF checkpoints for the inference tests: built from a config, saved locally.

Nothing is downloaded. The tokenizer is a character-level one built with `tokenizers`
so stop strings can be matched on decoded text: ids 0-2 are <pad>, <s>, </s>; then the
95 printable ASCII characters; then two-letter tokens "aa", "ab", ... up to the vocab.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

VOCAB = 300
EOS = 2


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)]
    letters = string.ascii_lowercase
    pairs = (a + b for a in letters for b in letters)
    while len(pieces) < VOCAB:
        pieces.append(next(pairs))
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(family: str = "llama"):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(tie_word_embeddings=False, **common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(tie_word_embeddings=True, **common)
    raise ValueError(family)


def build_model(seed: int, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


def save_tiny_model(path: Path, seed: int, family: str = "llama", with_tokenizer: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    build_model(seed, family).save_pretrained(str(path))
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return path
