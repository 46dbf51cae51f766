"""Pipeline benchmark on the tiny CPU config (run by hand; prints ratios measured in one run).

1. Time per RL step split into rollout / prepare (old log-probs) / train / sync, for GRPO with
   n = 16 and PODS with n = 16, m = 4. Goal: PODS train phase <= 0.35x GRPO's.
2. Sequence packing vs padding: one optimizer step over a skewed length mix (most responses
   short, a few long), rows packed by token budget vs every row padded to the longest.
   Goal: packing >= 1.5x faster.

    .venv/bin/python benchmarks/pipeline.py [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMON = ["trainer.warmup_sft_steps=0", "eval.every_steps=0", "checkpoint.export_hf=false",
          "logging.progress_bar=false", "logging.plot=false", "rollout.prompts_per_step=16",
          "rollout.max_new_tokens=6", "reward.num_workers=2"]


def rl_phases(rank, world_size, steps, run_root):
    from pipeline.config import load_job_config
    from pipeline.trainer import Trainer

    out = {}
    for label, extra in (("grpo n=16", ["algorithm.name=grpo", "rollout.n_samples=16"]),
                         ("pods n=16 m=4", ["algorithm.name=pods", "rollout.n_samples=16",
                                            "algorithm.downsample={keep: 4}"])):
        cfg = load_job_config("examples/tiny/grpo.yaml",
                              COMMON + extra + ["algorithm.kl_coef=0.0",
                                                f"logging.run_dir={run_root}/{label.split()[0]}"])
        t = Trainer(cfg)
        try:
            t.sync_weights()
            t.train_one_step()  # warm caches and the reward pool
            rows = [t.train_one_step() for _ in range(steps)]
        finally:
            t.close()
        out[label] = {k: statistics.median(r[k] for r in rows)
                      for k in ("time_rollout", "time_prepare", "time_train", "time_sync")}
    return out


def packing_vs_padding(rank, world_size, repeats):
    import torch

    from megatron_ext.model import ModelConfig, build_transformer_config, load_hf_config, model_provider
    from megatron_ext.packing import Row
    from megatron_ext.parallel import ParallelConfig, initialize
    from megatron_ext.policy_step import policy_update
    from megatron_ext.train import OptimizerConfig, build_policy

    initialize(ParallelConfig())
    hf = load_hf_config(dict(model_type="qwen2", vocab_size=512, hidden_size=256,
                             intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=2048))
    mc = ModelConfig(hf_config=hf)
    cfg = build_transformer_config(hf, mc)
    model, opt = build_policy(model_provider(hf, cfg, mc), cfg, OptimizerConfig(lr=1e-5))
    g = torch.Generator().manual_seed(0)
    # Skewed mix: 56 responses of 16-64 tokens, 8 of 512-1024 (prompts 32 tokens).
    lengths = [int(torch.randint(16, 64, (1,), generator=g)) for _ in range(56)] + \
              [int(torch.randint(512, 1024, (1,), generator=g)) for _ in range(8)]
    rows = [Row(tokens=torch.randint(1, 512, (32 + n,), generator=g).tolist(), loss_start=32)
            for n in lengths]
    longest = max(len(r.tokens) for r in rows)
    padded = [Row(tokens=r.tokens + [0] * (longest - len(r.tokens)), loss_start=r.loss_start)
              for r in rows]
    total = sum(r.n_scored for r in rows)

    def loss_fn(row_ids, lp, ent, mask):
        real = torch.tensor([rows[i].n_scored for i in row_ids])
        keep = torch.arange(lp.shape[1])[None, :] < real[:, None]  # padding is not scored
        loss = -(lp * keep).sum() / total
        return loss, {"loss": loss}

    def timed(rs, budget):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            policy_update(model, opt, rs, loss_fn, token_budget=budget, vocab_size=512)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    budget = 4096
    return {"packed_s": timed(rows, budget), "padded_s": timed(padded, budget),
            "tokens_real": sum(len(r.tokens) for r in rows), "tokens_padded": longest * len(rows)}


def main():
    from megatron_ext.multirank import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from examples.tiny.make_assets import build

    build()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        phases = run_ranks(rl_phases, 1, args.steps, tmp, timeout=3600)[0]
    print(f"RL step phases on the tiny config (median of {args.steps} steps, seconds)")
    print(f"{'':16}{'rollout':>10}{'prepare':>10}{'train':>10}{'sync':>10}")
    for label, p in phases.items():
        print(f"{label:16}" + "".join(f"{p[k]:10.3f}" for k in
                                      ("time_rollout", "time_prepare", "time_train", "time_sync")))
    ratio = phases["pods n=16 m=4"]["time_train"] / phases["grpo n=16"]["time_train"]
    print(f"PODS train / GRPO train = {ratio:.3f}  (goal <= 0.35)")
    pk = run_ranks(packing_vs_padding, 1, args.repeats, timeout=3600)[0]
    print(f"\npacking vs padding, one optimizer step, 64 rows ({pk['tokens_real']} real tokens, "
          f"{pk['tokens_padded']} padded)")
    print(f"packed {pk['packed_s']:.3f} s, padded {pk['padded_s']:.3f} s, "
          f"speed-up {pk['padded_s'] / pk['packed_s']:.2f}x  (goal >= 1.5)")


if __name__ == "__main__":
    main()
