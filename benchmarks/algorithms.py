"""Benchmark: PODS selection and every advantage estimator against plain references.

    python benchmarks/algorithms.py               # PODS P=1024 n=64 m=16; estimators 512x16
    python benchmarks/algorithms.py --repeats 30 --tokens 1024

Each row times ``pipeline.algorithms`` (vectorised torch, float64 inside) and a plain reference
measured in the same run on the same inputs, checks that both give the same answer, and prints
the ratio reference/ours. References:

- PODS, small n: brute force over all C(n, m) subsets per prompt (pure Python).
- PODS, n=64: the same sort + prefix-sum + m+1 candidates rule, as a Python loop per prompt
  (brute force would be C(64,16) ~ 5e14 subsets per prompt).
- Per-response estimators (GRPO, Dr. GRPO, RLOO, COPO, AAPO, JEPO): a Python loop over prompts
  and responses on Python floats.
- Per-token estimators (REINFORCE++-baseline, SPRO; T tokens per response): a Python loop over
  prompts, each group's [G,T] block done with torch ops.

Time: fastest of ``--repeats`` runs after one warm-up, wall clock, ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import Counter

import torch

from pipeline.algorithms import (aapo_advantages, copo_advantages, grpo_advantages,
                                 jepo_advantages, jepo_normalize, max_variance_subset,
                                 reinforce_pp_advantages, rloo_advantages, spro_advantages)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` calls after a warm-up (seconds), and the last result. The fastest,
    not the median: on a shared machine the slower runs measure the neighbours."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


# ----------------------------------------------------------------------------- references

def _pvar(xs):
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / len(xs)


def brute_force_subsets(rows, m):
    """Best population variance over all m-subsets, per row."""
    return [max(_pvar(c) for c in itertools.combinations(row, m)) for row in rows]


def loop_max_variance(rows, m):
    """The sort + prefix-sum rule with the same tie break, one prompt at a time."""
    out = []
    for row in rows:
        n = len(row)
        mean = sum(row) / n
        order = sorted(range(n), key=lambda c: row[c])  # Python's sort is stable
        values = [row[c] - mean for c in order]
        s1, s2 = [0.0], [0.0]
        for v in values:
            s1.append(s1[-1] + v)
            s2.append(s2[-1] + v * v)
        var = []
        for k in range(m + 1):
            a = s1[k] + s1[n] - s1[n - m + k]
            b = s2[k] + s2[n] - s2[n - m + k]
            var.append(b / m - (a / m) ** 2)
        best = max(var)
        tied = [k for k in range(m + 1) if var[k] >= best - 1e-9 * (1 + abs(best))]
        k = min(tied, key=lambda k: (abs(2 * k - m), k))
        out.append(sorted(order[:k] + order[n - m + k:]))
    return out


def loop_grpo(rows, scale=True, eps=1e-6):
    out = []
    for row in rows:
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (g - 1))
        out.append([(x - mean) / (std + eps) if scale else x - mean for x in row])
    return out


def loop_rloo(rows):
    return [[x - (sum(row) - x) / (len(row) - 1) for x in row] for row in rows]


def loop_aapo(rows, ref_rows):
    out = []
    for row, grp, ref in zip(rows, loop_grpo(rows, eps=1e-4), ref_rows):
        out.append([a + min(max(x - y, -0.2), 0.28) for a, x, y in zip(grp, row, ref)])
    return out


def loop_copo(rows, answer_rows):
    """Returns (local, global, weight) per prompt, as lists."""
    local = loop_grpo(rows)
    entropy, prompt_reward = [], []
    for row, answers in zip(rows, answer_rows):
        g = len(answers)
        entropy.append(-sum(c / g * math.log2(c / g) for c in Counter(answers).values()))
        prompt_reward.append(sum(row) / g)
    mean = sum(prompt_reward) / len(prompt_reward)
    std = math.sqrt(sum((x - mean) ** 2 for x in prompt_reward) / (len(prompt_reward) - 1))
    glob, weight = [], []
    for row, h, r in zip(rows, entropy, prompt_reward):
        glob.append([(r - mean) / (std + 1e-6)] * len(row))
        w = 1 / (1 + math.exp(-5.0 * (h - 1.0)))
        weight.append([w * (x != 0) for x in row])
    return local, glob, weight


def _lse(xs):
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def loop_jepo(rows):
    raw = []
    for ell in rows:
        n = len(ell)
        bound = _lse(ell) - math.log(n)
        raw.append([bound - (_lse(ell[:i] + ell[i + 1:]) - math.log(n - 1)) for i in range(n)])
    flat = [a for row in raw for a in row]
    std = math.sqrt(_pvar(flat))
    return [[min(max(a / (std + 1e-8), -1.0), 1.0) for a in row] for row in raw]


def loop_reinforce_pp(rewards, mask):
    g = rewards.shape[1]
    blocks = []
    for j in range(rewards.shape[0]):
        r = rewards[j].double()
        blocks.append((r - r.mean()).unsqueeze(1).expand(g, mask.shape[1]))
    centred = torch.cat(blocks)
    valid = centred[mask]
    return torch.where(mask, (centred - valid.mean()) / (valid.std() + 1e-8), 0.0)


def loop_spro(rewards, old, ref, mask, beta=0.05):
    g = rewards.shape[1]
    blocks = []
    for j in range(rewards.shape[0]):
        rows = slice(j * g, (j + 1) * g)
        m = mask[rows]
        c = (beta * (old[rows] - ref[rows]).double() * m).cumsum(dim=1)
        active = m.sum(dim=0)
        mean = (c * m).sum(dim=0) / active.clamp(min=1)
        msa = torch.where(m & (active >= 2), c - mean, 0.0)
        r = rewards[j].double()
        outcome = ((r - r.mean()) / (r.std() + 1e-6)).unsqueeze(1)
        blocks.append(torch.where(m, outcome + msa, 0.0))
    return torch.cat(blocks)


# ----------------------------------------------------------------------------- driver

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=256, help="T for per-token estimators")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the dev machine is shared, and 2 contended "
                             "threads turn sub-millisecond ops into tens of ms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_out = []

    def record(name, ours_fn, ref_fn, agree):
        ours_s, ours = timed(ours_fn, args.repeats)
        ref_s, ref = timed(ref_fn, max(1, args.repeats // 3))
        ok = agree(ours, ref)
        rows_out.append((name, ours_s, ref_s, ok))
        print(f"{name:<44} {ours_s * 1e3:10.3f} ms {ref_s * 1e3:12.2f} ms {ref_s / ours_s:9.1f}x"
              f"  {'agree' if ok else 'DIFFER'}", flush=True)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64 inputs")
    print(f"{'':<44} {'ours':>13} {'reference':>15} {'ratio':>10}")

    # PODS, small n: brute force.
    small = torch.randint(0, 6, (256, 12), generator=gen).double()
    small_rows = small.tolist()
    record("PODS max-variance P=256 n=12 m=4 (brute force)",
           lambda: max_variance_subset(small, 4), lambda: brute_force_subsets(small_rows, 4),
           lambda cols, best: all(abs(_pvar([row[c] for c in kept]) - b) <= 1e-9 * (1 + b)
                                  for row, kept, b in zip(small_rows, cols.tolist(), best)))

    # PODS, the paper's setting: binary-ish rewards with ties (reward 0/1 plus partial credit).
    big = (torch.randint(0, 2, (1024, 64), generator=gen)
           + 0.5 * torch.randint(0, 2, (1024, 64), generator=gen)).double()
    big_rows = big.tolist()
    record("PODS max-variance P=1024 n=64 m=16 (loop)",
           lambda: max_variance_subset(big, 16), lambda: loop_max_variance(big_rows, 16),
           lambda cols, ref: cols.tolist() == ref)

    p, g, t = 512, 16, args.tokens
    rewards = torch.randint(0, 2, (p, g), generator=gen).double()
    reward_rows = rewards.tolist()

    def close(ours, ref):
        return torch.allclose(torch.as_tensor(ours, dtype=torch.float64),
                              torch.as_tensor(ref, dtype=torch.float64), atol=1e-9, rtol=1e-9)

    record("GRPO 512x16", lambda: grpo_advantages(rewards), lambda: loop_grpo(reward_rows), close)
    record("Dr. GRPO 512x16", lambda: grpo_advantages(rewards, scale=False),
           lambda: loop_grpo(reward_rows, scale=False), close)
    record("RLOO 512x16", lambda: rloo_advantages(rewards), lambda: loop_rloo(reward_rows), close)
    ref_rewards = torch.randint(0, 2, (p, g), generator=gen).double()
    ref_rows = ref_rewards.tolist()
    record("AAPO 512x16", lambda: aapo_advantages(rewards, ref_rewards),
           lambda: loop_aapo(reward_rows, ref_rows), close)
    answers = torch.randint(0, 4, (p, g), generator=gen)
    answer_rows = answers.tolist()
    record("COPO 512x16 (local, global, weight)",
           lambda: torch.stack(copo_advantages(rewards, answers)),
           lambda: loop_copo(reward_rows, answer_rows), close)
    ell = -20 * torch.rand(p, g, generator=gen, dtype=torch.float64)
    ell_rows = ell.tolist()
    valid = torch.ones(p, g, dtype=torch.bool)
    record("JEPO multi-sample + normalise 512x16",
           lambda: jepo_normalize(jepo_advantages(ell, valid), valid),
           lambda: loop_jepo(ell_rows), close)

    lengths = torch.randint(1, t + 1, (p * g, 1), generator=gen)
    mask = torch.arange(t) < lengths
    old = -torch.rand(p * g, t, generator=gen, dtype=torch.float64)
    ref = -torch.rand(p * g, t, generator=gen, dtype=torch.float64)
    record(f"REINFORCE++-baseline 512x16, T={t}", lambda: reinforce_pp_advantages(rewards, mask),
           lambda: loop_reinforce_pp(rewards, mask), close)
    record(f"SPRO 512x16, T={t}", lambda: spro_advantages(rewards, old, ref, mask),
           lambda: loop_spro(rewards, old, ref, mask), close)

    if not all(ok for *_, ok in rows_out):
        raise SystemExit("some results differ from their reference")


if __name__ == "__main__":
    main()
