"""Megatron dist checkpoint -> Hugging Face checkpoint (sharded safetensors + index).

    python -m tools.convert_megatron_to_hf --ckpt DIR --out DIR [--hf-config PATH]
                                           [--tp N] [--pp M] [--max-shard-size 2GB] [--force]

Reads a checkpoint written by ``convert_hf_to_megatron`` or by the trainer (a resume
``step_<N>`` directory works too: its model part is used). The HF config comes from
``<ckpt>/hf/config.json`` unless ``--hf-config`` (a HF model dir or config.json) is given; the
generation config and tokenizer files stored next to it are copied. The weights stream out of
the model with :func:`megatron_ext.export.export_hf_weights` (the same code the rollout weight
sync uses), one shard per bucket, written by the single export rank; the output appears
under ``out`` only when complete, loadable by ``AutoModelForCausalLM.from_pretrained``. The
checkpoint dtype is kept (``config.json`` records it). Ranks as in ``convert_hf_to_megatron``.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

import torch.distributed as dist

from tools.convert_hf_to_megatron import conversion_model, run_cli, run_conversion


@dataclass
class Plan:
    ckpt: str
    out: str
    hf_config: str  # config.json path
    files_dir: str | None  # where config/generation config/tokenizer files are copied from
    tp: int
    pp: int
    dtype: str
    shard_bytes: int
    force: bool


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1GiB', '123' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 2GB or 500MB")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1] or " ")
    return int(float(m.group(1)) * base ** power)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_megatron_to_hf", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Megatron dist checkpoint directory")
    p.add_argument("--out", required=True, help="HF model directory to create")
    p.add_argument("--hf-config", default=None,
                   help="HF config (model dir or config.json) when the checkpoint has none")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load with")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> Plan:
    from megatron_ext.checkpoint import HF_SUBDIR, read_meta
    from megatron_ext.hf.mapping import HFMapping
    from megatron_ext.model import ModelConfig, load_hf_config, validate_model_layout

    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"--out {args.out} already exists; pass --force to replace it")
    meta = read_meta(args.ckpt)
    stored = os.path.join(args.ckpt, HF_SUBDIR)
    if args.hf_config:
        cfg = args.hf_config if args.hf_config.endswith(".json") else os.path.join(
            args.hf_config, "config.json")
        files_dir = None if args.hf_config.endswith(".json") else args.hf_config
        if files_dir is None and os.path.isdir(stored):
            files_dir = stored
    elif os.path.isfile(os.path.join(stored, "config.json")):
        cfg, files_dir = os.path.join(stored, "config.json"), stored
    else:
        raise FileNotFoundError(f"{args.ckpt} holds no HF config ({stored}/config.json); pass "
                                "--hf-config with the original model dir or config.json")
    hf = load_hf_config(cfg)
    if meta.get("model_type") and meta["model_type"] != hf.model_type:
        raise ValueError(f"{args.ckpt} holds a {meta['model_type']} model but {cfg} says "
                         f"model_type={hf.model_type!r}")
    HFMapping(hf)
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(meta.get("params_dtype", "float32"))
    if dtype is None:
        raise ValueError(f"{args.ckpt}: parameter dtype {meta['params_dtype']} is not supported")
    validate_model_layout(hf, ModelConfig(params_dtype=dtype), tp=args.tp, pp=args.pp)
    return Plan(os.path.abspath(args.ckpt), os.path.abspath(args.out), os.path.abspath(cfg),
                files_dir and os.path.abspath(files_dir), args.tp, args.pp, dtype,
                parse_size(args.max_shard_size), args.force)


def _convert_on_rank(rank: int, world_size: int, p: Plan) -> None:
    from megatron_ext.checkpoint import load_model_checkpoint
    from megatron_ext.export import write_hf_checkpoint

    with conversion_model(p.hf_config, p.tp, p.pp, p.dtype, rank, world_size) as (hf, model):
        load_model_checkpoint(p.ckpt, model)
        write_hf_checkpoint(model, p.out, hf_config=hf, config_path=p.hf_config,
                            files_dir=p.files_dir, shard_bytes=p.shard_bytes, force=p.force)


def main(argv=None) -> int:
    p = plan(parse_args(argv))
    run_conversion(_convert_on_rank, p.tp * p.pp, p)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"convert_megatron_to_hf: wrote {p.out} ({p.dtype})")
    return 0


if __name__ == "__main__":
    run_cli(main, "convert_megatron_to_hf")
