"""The planner's per-GPU memory for every example config, as a Markdown table.

    python benchmarks/plan_table.py [--gpu-mem 80] > table.md

Each config is planned at the node count its header states (8 GPUs per node), colocated.
Columns are GiB per GPU on the worst pipeline stage: resident = parameters + gradients +
optimizer state (+ FP8 weight copies); train = activations + logits; rollout = SGLang weights
+ KV cache; peak = the larger phase with the runtime overheads.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rows(gpu_mem: float):
    from pipeline.config import load_job_config
    from pipeline.plan import Hardware, estimate

    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml"))):
        if os.sep + "tiny" + os.sep in path:
            continue
        nodes = int(re.search(r"^# nodes: (\d+)", open(path).read(), re.M).group(1))
        cfg = load_job_config(path)
        plan = estimate(cfg, Hardware(nodes=nodes, gpus_per_node=8, gpu_mem_gib=gpu_mem))
        def t(name):
            return float(plan.term(name))
        par = cfg.parallel
        dp = nodes * 8 // (par.tensor_parallel * par.pipeline_parallel * par.context_parallel)
        yield {
            "config": os.path.relpath(path, os.path.join(ROOT, "examples")),
            "nodes": nodes,
            "TP/CP/PP/DP": f"{par.tensor_parallel}/{par.context_parallel}/{par.pipeline_parallel}/{dp}",
            "mb tokens": cfg.trainer.micro_batch_tokens,
            "resident": t("parameters") + t("gradients") + t("optimizer state") + t("fp8 weight copies"),
            "activations": t("activations"),
            "logits": t("logits + log-prob scratch"),
            "sglang w": t("sglang weights"),
            "KV": t("sglang KV cache"),
            "peak": plan.peak_gib,
            "phase": plan.peak_phase,
            "fits": "yes" if plan.fits else "NO",
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-mem", type=float, default=80.0)
    args = ap.parse_args(argv)
    table = list(rows(args.gpu_mem))
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---:" if isinstance(table[0][c], (int, float)) else "---" for c in cols) + "|")
    for r in table:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return 0 if all(r["fits"] == "yes" for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
