"""``groupwise``: the command line.

    groupwise train --config FILE [dotted.key=value ...] [--print-config] [--resume] [--nproc N]
    groupwise eval  --config FILE --ckpt HF_DIR [dotted.key=value ...]
    groupwise serve --model PATH --port N            (SGLang-protocol CPU stand-in)
    groupwise convert hf-to-megatron|megatron-to-hf ...
    groupwise plan  --config FILE --nodes N --gpus-per-node 8 --gpu-mem 80

``train`` runs SPMD: launch it with ``torchrun``/``srun`` (ranks from the environment) or, on
one CPU machine, with ``--nproc N`` to spawn N gloo ranks. The config is validated before
any process group starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _world_size(nproc: int | None) -> int:
    if nproc:
        return nproc
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def _quiet():
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|TE|cuda_graph_scope).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def cmd_train(args) -> int:
    from pipeline.config import load_job_config, print_config, validate
    from pipeline.config_io import ConfigError

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=true")
    try:
        cfg = load_job_config(args.config, overrides)
        world = _world_size(args.nproc)
        validate(cfg, world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(print_config(cfg), end="")
        return 0
    if args.nproc and args.nproc > 1 and "RANK" not in os.environ:
        from megatron_ext.multirank import run_ranks

        run_ranks(_train_rank, args.nproc, cfg, timeout=args.timeout)
        return 0
    from pipeline.data import DataError

    try:
        _train_rank(None, world, cfg)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0


def _train_rank(rank, world_size, cfg):
    import torch

    from pipeline.trainer import Trainer

    _quiet()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world_size, 1)))
    trainer = Trainer(cfg)
    try:
        last = trainer.run()
    finally:
        trainer.close()
    import torch.distributed as dist

    if dist.get_rank() == 0 and last:
        print("final step: " + " ".join(f"{k}={v:.4g}" for k, v in last.items()
                                        if isinstance(v, (int, float))), flush=True)
        if cfg.logging.plot:
            from tools.plot_metrics import plot_run

            path = plot_run(cfg.logging.run_dir)
            print(f"reward plot: {path}", flush=True)
    return None


def cmd_eval(args) -> int:
    from pipeline.config import load_job_config
    from pipeline.config_io import ConfigError

    try:
        cfg = load_job_config(args.config, list(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.eval.data is None:
        print("config error: eval.data is required for groupwise eval", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from inference.embedded import EmbeddedEngine
    from pipeline.evaluate import evaluate_replica
    from pipeline.rewards import RewardScorer

    _quiet()
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    with EmbeddedEngine.from_pretrained(args.ckpt, max_batch_size=cfg.rollout.batch_size) as engine, \
            RewardScorer(cfg.reward) as scorer:
        sums = evaluate_replica(engine, tok, scorer, cfg, seed=cfg.rollout.seed)
    n = max(sums.pop("prompts"), 1)
    print(" ".join(f"{k}={v / n:.4f}" for k, v in sums.items()) + f" prompts={int(n)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers get their arguments untouched (argparse's REMAINDER
    # would drop a leading option such as `plan --config F`).
    if argv and argv[0] == "serve":
        from inference.serve import main as serve_main

        return serve_main(argv[1:]) or 0
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    if argv and argv[0] == "plan":
        from pipeline.plan import main as plan_main

        return plan_main(argv[1:])
    ap = argparse.ArgumentParser(prog="groupwise", description="RL post-training for LLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run RL training")
    t.add_argument("--config", required=True)
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--nproc", type=int, default=None, help="spawn N local gloo ranks (CPU)")
    t.add_argument("--timeout", type=float, default=24 * 3600)
    t.add_argument("overrides", nargs="*", help="dotted.key=value")
    e = sub.add_parser("eval", help="evaluate a Hugging Face checkpoint on eval.data")
    e.add_argument("--config", required=True)
    e.add_argument("--ckpt", required=True, help="a Hugging Face model directory")
    e.add_argument("overrides", nargs="*")
    for name, helptext in (("serve", "SGLang-protocol server on the embedded engine (CPU)"),
                           ("convert", "hf-to-megatron | megatron-to-hf"),
                           ("plan", "check a layout and estimate memory per GPU")):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "eval":
        return cmd_eval(args)
    raise AssertionError(f"unhandled command {args.command}")


def _convert(rest: list[str]) -> int:
    if not rest or rest[0] not in ("hf-to-megatron", "megatron-to-hf"):
        print("usage: groupwise convert hf-to-megatron|megatron-to-hf [options]", file=sys.stderr)
        return 2
    if rest[0] == "hf-to-megatron":
        from tools.convert_hf_to_megatron import main as conv
    else:
        from tools.convert_megatron_to_hf import main as conv
    try:
        return conv(rest[1:]) or 0
    except (ValueError, OSError) as e:  # user-caused: name the problem, no traceback
        print(f"convert: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
