"""Benchmark: checkpoint conversion throughput vs a plain safetensors load + save.

    python benchmarks/convert.py                  # ~1 GB bf16 Llama-shaped random model
    python benchmarks/convert.py --layers 2       # smaller

One process, one rank (TP = PP = 1), everything on the same disk and in the same run:

- ``baseline``: ``safetensors.torch.load_file`` of every shard of the HF checkpoint, then
  ``save_file`` of the same tensors to a new directory — the floor for "read it and write it".
- ``hf -> megatron``: ``tools.convert_hf_to_megatron.main`` — header checks, model build,
  strict load with QKV/gate-up fusion and vocabulary padding, dist-checkpoint save (fsynced),
  HF files copied, atomic rename.
- ``megatron -> hf``: ``tools.convert_megatron_to_hf.main`` — model build, dist-checkpoint
  load, streaming export (QKV/gate-up split, vocabulary unpadded) into sharded safetensors
  plus index, atomic rename.

Throughput = bytes of HF tensor data / wall seconds. Imports and the process group are set up
before timing (they are a fixed cost of a few seconds per run, not a rate); the median of
``--repeats`` runs is reported, and the ratio conversion / baseline (goal: >= 0.5).

Files go to ``/dev/shm`` by default (memory-backed): on a shared machine a disk's write-back
state, set by whatever else is writing, dominates and reorders the timings; ``--workdir``
picks a disk directory instead. ``os.sync()`` runs before every timed step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_hf_checkpoint(path: str, layers: int, shard_bytes: int) -> int:
    """A random bf16 Llama-shaped checkpoint (hidden 2048, GQA 16/4, ffn 5504, vocab 32000,
    untied) written straight from the mapping's shapes; returns its tensor bytes."""
    from transformers import AutoConfig

    from megatron_ext.hf.files import ShardedSafetensorsWriter
    from megatron_ext.hf.mapping import HFMapping

    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                               num_hidden_layers=layers, num_attention_heads=16,
                               num_key_value_heads=4, max_position_embeddings=4096,
                               tie_word_embeddings=False, dtype="bfloat16")
    os.makedirs(path)
    cfg.save_pretrained(path)
    writer, bucket, size, total = ShardedSafetensorsWriter(path), [], 0, 0
    g = torch.Generator().manual_seed(0)
    for name, shape in HFMapping(cfg).hf_shapes().items():
        t = torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if bucket and size + nbytes > shard_bytes:
            writer.write_shard(bucket)
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
        total += nbytes
    writer.write_shard(bucket)
    writer.close()
    return total


def baseline(src: str, dst: str) -> None:
    from safetensors.torch import load_file, save_file

    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            save_file(load_file(os.path.join(src, name)), os.path.join(dst, name))


def timed(fn, *args) -> float:
    os.sync()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="8 layers: 0.97 GB in bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the checkpoints go (default /dev/shm)")
    args = ap.parse_args(argv)

    from megatron_ext.multirank import free_port
    from megatron_ext.parallel import ParallelConfig, initialize
    from tools import convert_hf_to_megatron, convert_megatron_to_hf
    from tools.convert_megatron_to_hf import parse_size

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    initialize(ParallelConfig(), rank=0, world_size=1)  # one rank: the converters run here

    work = tempfile.mkdtemp(dir=args.workdir, prefix="bench-convert-")
    try:
        src = os.path.join(work, "hf")
        nbytes = make_hf_checkpoint(src, args.layers, parse_size(args.shard_size))
        gb = nbytes / 1e9
        print(f"model: {args.layers} layers, {gb:.3f} GB of bf16 tensors, "
              f"{len([n for n in os.listdir(src) if n.endswith('.safetensors')])} shards, in {work}")
        times = {"baseline": [], "hf -> megatron": [], "megatron -> hf": []}
        for i in range(args.repeats):
            paths = {k: os.path.join(work, f"{k[:2]}{i}") for k in ("bl", "mc", "hf")}
            times["baseline"].append(timed(baseline, src, paths["bl"]))
            times["hf -> megatron"].append(timed(convert_hf_to_megatron.main,
                                                 ["--hf", src, "--out", paths["mc"]]))
            times["megatron -> hf"].append(timed(convert_megatron_to_hf.main,
                                                 ["--ckpt", paths["mc"], "--out", paths["hf"],
                                                  "--max-shard-size", args.shard_size]))
            for p in paths.values():
                shutil.rmtree(p)
        base = statistics.median(times["baseline"])
        print(f"{'':16s} {'median s':>9s} {'GB/s':>7s} {'vs baseline':>12s}   runs (s)")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"{label:16s} {med:9.2f} {gb / med:7.3f} {base / med:12.2f}   "
                  + " ".join(f"{t:.2f}" for t in ts))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
