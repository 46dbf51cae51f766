"""Render a run's reward, pass rate, response length, entropy and KL curves to PNG.

    python tools/plot_metrics.py RUN_DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os

PANELS = (("reward_mean", "reward (all samples)"), ("pass_rate", "pass rate"),
          ("response_length", "response length (tokens)"), ("entropy", "token entropy"),
          ("kl", "KL to reference"), ("eval_pass_at_k", "eval pass@k"))


def load_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a groupwise run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(run_dir)
    panels = [(k, t) for k, t in PANELS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2))
    axes = [axes] if len(panels) <= 1 else list(axes)
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
