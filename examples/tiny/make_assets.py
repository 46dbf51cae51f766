"""Build the tiny CPU example's assets locally (nothing is downloaded): a character-level
tokenizer, a randomly initialised ~0.6M-parameter Qwen2 model in Hugging Face format, and an
addition task (a two-digit plus a one-digit number) split into train and held-out eval sets.

    python examples/tiny/make_assets.py [--out examples/tiny/build] [--force]

A prompt is ``"37+8="``; a correct response is ``"#45"`` then end-of-sequence; the reward
reads the answer after ``#`` and checks it with math-verify. Idempotent: existing assets are
kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import random

CHARS = list("0123456789+=#")
SPECIALS = ["<pad>", "<eos>"]
HERE = os.path.dirname(os.path.abspath(__file__))


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(tokenizer, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config)


def build_data(out: str, seed: int, eval_size: int = 200) -> None:
    # Two-digit + one-digit: a 0.6M-parameter model picks up the carry within ~200 supervised
    # steps (2+2 digits takes several times longer), so warm-up plus RL fit in minutes on CPU.
    pairs = [(a, b) for a in range(100) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    for name, part in (("eval", pairs[:eval_size]), ("train", pairs[eval_size:])):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for a, b in part:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")


def build(out: str = os.path.join(HERE, "build"), seed: int = 0, force: bool = False) -> str:
    done = os.path.join(out, "DONE")
    if os.path.exists(done) and not force:
        return out
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(os.path.join(out, "model"))
    tokenizer.save_pretrained(os.path.join(out, "model"))
    build_data(out, seed)
    with open(done, "w") as f:
        f.write("ok\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "build"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(f"tiny assets in {build(args.out, args.seed, args.force)}")


if __name__ == "__main__":
    main()
