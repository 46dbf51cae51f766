"""Hugging Face checkpoint -> Megatron dist checkpoint (``torch_dist``), reshardable.

    python -m tools.convert_hf_to_megatron --hf PATH --out DIR [--tp N] [--pp M]
                                           [--dtype bf16|fp32] [--force]

Everything a user can get wrong is checked before any rank starts: the config's
``model_type``, the layout (heads, layers divisible by TP/PP), every safetensors file's header
(a truncated file is named), and the tensor names and shapes against the config (missing,
extra and mis-shaped tensors are named). The model is then built at TP x PP, each rank reads
only its own tensors from the safetensors files, and the checkpoint is written to
``<out>.tmp-*`` and renamed to ``out`` when complete, with the HF config, generation config and
tokenizer files stored in ``<out>/hf`` (so the reverse conversion needs nothing else).

Ranks: under ``torchrun`` (or inside any initialised process group) the current ranks do the
work (the world size must be a multiple of TP x PP); otherwise on CPU ``TP x PP`` gloo ranks
are spawned; on one GPU it runs in this process; several GPUs need ``torchrun``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

import torch.distributed as dist

DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


@dataclass
class Plan:
    hf_dir: str
    out: str
    tp: int
    pp: int
    dtype: str
    force: bool


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_hf_to_megatron", description=__doc__.split("\n")[0])
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="Megatron checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert with")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert with")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="parameter dtype of the checkpoint (default: the HF weights' dtype)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no process group; raises with a message naming the problem."""
    from megatron_ext.hf.files import SafetensorsCheckpoint
    from megatron_ext.hf.mapping import HFMapping
    from megatron_ext.model import ModelConfig, load_hf_config, validate_model_layout

    if not os.path.isdir(args.hf):
        raise FileNotFoundError(f"--hf {args.hf}: not a directory")
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"--out {args.out} already exists; pass --force to replace it")
    hf = load_hf_config(args.hf)
    ckpt = SafetensorsCheckpoint(args.hf)
    HFMapping(hf).check_hf_tensors(ckpt.shapes, args.hf)
    dtype = DTYPE_NAMES[args.dtype] if args.dtype else _weights_dtype(ckpt, args.hf)
    validate_model_layout(hf, ModelConfig(params_dtype=dtype), tp=args.tp, pp=args.pp)
    return Plan(os.path.abspath(args.hf), os.path.abspath(args.out), args.tp, args.pp, dtype,
                args.force)


def _weights_dtype(ckpt, where: str) -> str:
    import torch

    found = set(ckpt.dtypes.values())
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    if len(found) == 1 and next(iter(found)) in names:
        return names[next(iter(found))]
    raise ValueError(f"{where}: weights are {sorted(str(d) for d in found)}; pass --dtype "
                     "bf16 or --dtype fp32")


def build_model(hf, tp: int, pp: int, dtype: str) -> list:
    """Bare model chunks of this rank at TP x PP (process groups already initialised), with
    no random initialisation: every parameter is about to be overwritten."""
    from megatron_ext.model import ModelConfig, build_transformer_config, model_provider
    from megatron_ext.train import build_model_chunks

    mc = ModelConfig(hf_config=hf, params_dtype=dtype, extra={"perform_initialization": False})
    cfg = build_transformer_config(hf, mc, tp=tp, pp=pp)
    return build_model_chunks(model_provider(hf, cfg, mc), cfg)


def run_conversion(fn, world: int, *args):
    """Run ``fn(rank, world_size, *args)`` on the conversion's ranks (see module docstring)."""
    import torch

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        size = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
        if size % world:
            raise ValueError(f"world size {size} is not a multiple of TP x PP = {world}")
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
        return fn(rank, size, *args)
    if torch.cuda.is_available():
        if world > 1:
            raise ValueError(f"TP x PP = {world} needs {world} GPUs: launch with "
                             f"torchrun --nproc-per-node {world} -m tools.<converter> ...")
        from megatron_ext.multirank import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        return fn(0, 1, *args)
    from megatron_ext.multirank import run_ranks

    return run_ranks(fn, world, *args, timeout=7 * 24 * 3600)


@contextlib.contextmanager
def conversion_model(config_path: str, tp: int, pp: int, dtype: str, rank: int, world_size: int):
    """``with conversion_model(...) as (hf, model)``: process groups for TP x PP on this rank
    (unless the caller's are already up, which are then left alone), the HF config from
    ``config_path`` and the bare model chunks of :func:`build_model`."""
    from megatron_ext.model import load_hf_config
    from megatron_ext.parallel import ParallelConfig, destroy, initialize

    created = not dist.is_initialized()
    initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), rank=rank,
               world_size=world_size)
    try:
        hf = load_hf_config(config_path)
        yield hf, build_model(hf, tp, pp, dtype)
    finally:
        if created:
            destroy()


def run_cli(main, name: str) -> None:
    """A converter's ``__main__``: exit with main's code; a user error is one line on stderr."""
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)


def _convert_on_rank(rank: int, world_size: int, p: Plan) -> None:
    from megatron_ext.checkpoint import save_model_checkpoint, staged_directory
    from megatron_ext.export import load_hf_weights
    from megatron_ext.hf.files import SafetensorsCheckpoint

    with conversion_model(p.hf_dir, p.tp, p.pp, p.dtype, rank, world_size) as (hf, model):
        weights = SafetensorsCheckpoint(p.hf_dir)
        load_hf_weights(model, weights, hf_config=hf, source=p.hf_dir)
        weights.close()
        with staged_directory(p.out, force=p.force) as tmp:
            save_model_checkpoint(tmp, model, hf_config=hf, hf_files_dir=p.hf_dir)


def main(argv=None) -> int:
    p = plan(parse_args(argv))
    run_conversion(_convert_on_rank, p.tp * p.pp, p)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"convert_hf_to_megatron: wrote {p.out} (TP={p.tp}, PP={p.pp}, {p.dtype})")
    return 0


if __name__ == "__main__":
    run_cli(main, "convert_hf_to_megatron")
