"""Token balance across DP ranks before and after swapping groups (run by hand).

A data-parallel step waits for its slowest rank, so the step's training time follows the
heaviest rank's tokens: ``max / mean`` of the per-rank token loads is the slowdown against a
perfect split. Response lengths are drawn per group from a log-normal (RL responses are
heavy-tailed: a few long chains of thought, many short answers), for the example configs'
batch shapes. Groups are swapped only within a mini-batch (each optimizer step
is a synchronisation point), so the figures are means over a step's mini-batches. Prints the
imbalance before and after, the share of groups that travel, and the time the plan takes.

    .venv/bin/python benchmarks/dp_balance.py
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, prompts per step, samples per prompt, prompt tokens, max response tokens,
#  mini-batches per step, DP sizes)
SHAPES = [
    ("grpo 256x8, 4k, 4 updates", 256, 8, 1024, 4096, 4, (4, 8, 32)),
    ("grpo 256x8, 4k, 1 update", 256, 8, 1024, 4096, 1, (8, 32)),
    ("dapo 512x16, 20k, 16 updates", 512, 16, 2048, 20480, 16, (2, 8)),
    ("pods 128x16 kept, 2k, 1 update", 128, 16, 1024, 2048, 1, (4, 16)),
]


def group_loads(rng: random.Random, prompts: int, n: int, prompt_tokens: int, max_new: int):
    loads = []
    for _ in range(prompts):
        p = rng.randint(prompt_tokens // 8, prompt_tokens)
        # A per-prompt difficulty scales all its responses: hard prompts get long answers.
        scale = rng.lognormvariate(0.0, 0.6)
        loads.append(sum(p + min(max_new, int(scale * rng.lognormvariate(6.5, 0.7))) for _ in range(n)))
    return loads


def main() -> int:
    from pipeline.dp_balance import _balance_blocks

    rng = random.Random(0)
    print(f"{'shape':34}{'DP':>4}{'before':>9}{'after':>9}{'moved':>8}{'plan ms':>9}")
    for label, prompts, n, ptok, new, updates, dps in SHAPES:
        loads = group_loads(rng, prompts, n, ptok, new)
        for dp in dps:
            per = prompts // dp
            tokens = [loads[r * per:(r + 1) * per] for r in range(dp)]
            t0 = time.perf_counter()
            held, before, after = _balance_blocks(tokens, updates)
            ms = (time.perf_counter() - t0) * 1e3
            moved = sum(src != r for r, slots in enumerate(held) for src, _ in slots)
            print(f"{label:34}{dp:>4}{before:>9.3f}{after:>9.3f}{moved / prompts:>8.0%}{ms:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
