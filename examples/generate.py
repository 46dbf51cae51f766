"""Write the example configs: every model x algorithm family, bf16, plus an FP8 variant.

    python examples/generate.py [--check]

One table of models (their Hugging Face config fields, inline so `groupwise plan` runs without
the weights), one of layouts for 8x H100-80GB nodes, one of algorithm recipes; each output
``examples/<model>/<algorithm>.yaml`` states its node count and the planner's memory per GPU
in its header. ``--check`` exits 1 if any file on disk differs from what would be written.

To train, point ``model.hf_config`` at the downloaded model directory (the inline fields are
its config.json) and ``data.paths`` at your prompts, e.g. through the Slurm scripts'
OVERRIDES.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_QWEN2 = dict(model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rope_theta=1000000.0,
              tie_word_embeddings=False, vocab_size=152064, bos_token_id=151643, eos_token_id=151645,
              use_sliding_window=False, initializer_range=0.02)
_LLAMA31 = dict(model_type="llama", hidden_act="silu", max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192, rope_type="llama3"),
                tie_word_embeddings=False, vocab_size=128256, bos_token_id=128000, eos_token_id=128009,
                attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5, initializer_range=0.02)
_QWEN3 = dict(model_type="qwen3", hidden_act="silu", max_position_embeddings=40960, rope_theta=1000000.0,
              tie_word_embeddings=False, vocab_size=151936, head_dim=128, attention_bias=False,
              bos_token_id=151643, eos_token_id=151645, rms_norm_eps=1e-6, initializer_range=0.02)


def _dims(layers, hidden, ffn, heads, kv_heads, **kw):
    return dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                num_attention_heads=heads, num_key_value_heads=kv_heads, **kw)


# name: (HF repo, config fields, layout for 8x H100-80GB nodes): training nodes, TP, PP and the
# tensor parallelism of the colocated SGLang servers. SGLang's request concurrency and memory
# fraction are derived from the planner (`rollout_settings`).
MODELS = {
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", {**_QWEN2, **_dims(28, 3584, 18944, 28, 4, rms_norm_eps=1e-6)},
                   dict(nodes=1, tp=2, pp=1, sglang_tp=2)),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B-Instruct", {**_QWEN2, **_dims(48, 5120, 13824, 40, 8, rms_norm_eps=1e-5)},
                    dict(nodes=2, tp=4, pp=1, sglang_tp=4)),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B-Instruct", {**_QWEN2, **_dims(64, 5120, 27648, 40, 8, rms_norm_eps=1e-5)},
                    dict(nodes=4, tp=8, pp=1, sglang_tp=8)),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B-Instruct", {**_QWEN2, **_dims(80, 8192, 29568, 64, 8, rms_norm_eps=1e-6)},
                    dict(nodes=8, tp=8, pp=4, sglang_tp=8)),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", {**_LLAMA31, **_dims(32, 4096, 14336, 32, 8)},
                    dict(nodes=1, tp=2, pp=1, sglang_tp=2)),
    "llama3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", {**_LLAMA31, **_dims(80, 8192, 28672, 64, 8)},
                     dict(nodes=8, tp=8, pp=4, sglang_tp=8)),
    "qwen3-8b": ("Qwen/Qwen3-8B", {**_QWEN3, **_dims(36, 4096, 12288, 32, 8)},
                 dict(nodes=1, tp=2, pp=1, sglang_tp=2)),
    "qwen3-32b": ("Qwen/Qwen3-32B", {**_QWEN3, **_dims(64, 5120, 25600, 64, 8)},
                  dict(nodes=4, tp=8, pp=1, sglang_tp=8)),
}

_PROMPT = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."

# Algorithm recipes, after the papers' runs: batch (prompts x samples), lengths, updates per
# rollout step, and the algorithm section. DAPO's is its paper's (512 x 16, 20k responses with
# a 4k overlong band, 16 updates); PODS keeps 16 of 64 rollouts; the others are the common
# 7B-32B math-RL recipe (128 x 8, 1k prompts, 4k responses).
ALGORITHMS = {
    "grpo": dict(prompts=256, n=8, prompt_tokens=1024, new_tokens=4096, updates=4,
                 algorithm=dict(name="grpo", kl_coef=0.001)),
    "dapo": dict(prompts=512, n=16, prompt_tokens=2048, new_tokens=20480, updates=16,
                 algorithm=dict(name="dapo", overlong_max_len=20480, overlong_cache_len=4096)),
    "pods": dict(prompts=128, n=64, prompt_tokens=1024, new_tokens=2048, updates=1,
                 algorithm=dict(name="pods", downsample=dict(rule="max_variance", keep=16))),
    "copo": dict(prompts=128, n=8, prompt_tokens=1024, new_tokens=4096, updates=2,
                 algorithm=dict(name="copo", gamma=20.0, rho=1.5)),
    "aapo": dict(prompts=128, n=8, prompt_tokens=1024, new_tokens=4096, updates=1,
                 algorithm=dict(name="aapo")),
    "jepo": dict(prompts=128, n=8, prompt_tokens=1024, new_tokens=4096, updates=1,
                 algorithm=dict(name="jepo", beta_sup=0.01)),
    "spro": dict(prompts=128, n=8, prompt_tokens=1024, new_tokens=4096, updates=2,
                 algorithm=dict(name="spro", beta=0.05)),
}
FP8_VARIANTS = ("dapo",)  # <algorithm>-fp8.yaml per model; FP8 composes with any algorithm


def micro_batch_tokens(row_len: int) -> int:
    """A token budget that packs at least one longest row, in steps of 8k."""
    return max(16384, -(-row_len // 8192) * 8192)


def context_parallel(row_len: int) -> int:
    """CP=2 for rows beyond 16k tokens (DAPO's 22k): each GPU holds half of every sequence's
    activations, and the data-parallel size halves instead of the per-GPU memory growing."""
    return 2 if row_len > 16384 else 1


TARGET_PEAK_GIB = 72.0  # of 80: leaves 8 GiB for what the estimate misses
GPU_MEM_GIB = 80.0


def build(model: str, algo: str, fp8: bool, running: int = 8, mem_fraction: float = 0.5) -> dict:
    repo, hf, lay = MODELS[model]
    a = ALGORITHMS[algo]
    row_len = a["prompt_tokens"] + a["new_tokens"]
    algorithm = dict(a["algorithm"])
    sglang_args = ["--max-running-requests", str(running)]
    model_section = dict(hf_config=dict(hf), params_dtype="bf16", make_vocab_size_divisible_by=128,
                         recompute_granularity="full", recompute_num_layers=1)
    if fp8:
        model_section.update(fp8="hybrid", fp8_recipe="blockwise")
        sglang_args += ["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"]
        # The engine samples from FP8 weights, the trainer scores with BF16 master weights
        # through FP8 GEMMs: different numerics, so importance-weight the mismatch (TIS).
        algorithm.update(tis="truncate", tis_cap=2.0)
    return dict(
        model=model_section,
        parallel=dict(tensor_parallel=lay["tp"], pipeline_parallel=lay["pp"],
                      context_parallel=context_parallel(row_len), sequence_parallel=lay["tp"] > 1),
        optimizer=dict(lr=1.0e-6, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, clip_grad=1.0,
                       use_distributed_optimizer=True, overlap_grad_reduce=True,
                       overlap_param_gather=True, lr_warmup_steps=10),
        rollout=dict(engine="sglang", prompts_per_step=a["prompts"], n_samples=a["n"],
                     max_new_tokens=a["new_tokens"], temperature=1.0, top_p=1.0,
                     weight_bucket_mb=512,
                     # ServerConfig fields (inference.launcher); extra_args go to SGLang as given
                     sglang=dict(tp_size=lay["sglang_tp"], mem_fraction_static=mem_fraction,
                                 extra_args=sglang_args)),
        algorithm=algorithm,
        data=dict(paths=["/data/math/train.jsonl"], prompt_field="prompt", answer_field="answer",
                  apply_chat_template=True, prompt_template=_PROMPT,
                  max_prompt_tokens=a["prompt_tokens"]),
        reward=dict(function="math", answer_marker=None, num_workers=16, timeout_s=10.0),
        trainer=dict(steps=500, updates_per_step=a["updates"],
                     micro_batch_tokens=micro_batch_tokens(row_len), seed=1234),
        checkpoint=dict(every_steps=20, keep_last=2, resume=True),
        logging=dict(run_dir=f"runs/{model}-{algo}{'-fp8' if fp8 else ''}", progress_bar=False),
    )


def _plan(cfg_dict: dict, nodes: int):
    from pipeline.config import JobConfig
    from pipeline.config_io import from_dict
    from pipeline.plan import Hardware, estimate

    return estimate(from_dict(JobConfig, cfg_dict, ""), Hardware(nodes=nodes, gpu_mem_gib=GPU_MEM_GIB))


def rollout_settings(model: str, algo: str, fp8: bool) -> tuple[dict, object]:
    """The config with the most concurrent SGLang requests (a multiple of 8, at most the
    requests a server gets per step) whose planned peak stays under TARGET_PEAK_GIB, and
    SGLang's static memory fraction sized to its weights + KV cache; with its plan."""
    nodes = MODELS[model][2]["nodes"]
    a = ALGORITHMS[algo]
    servers = nodes * 8 // MODELS[model][2]["sglang_tp"]
    most = max(8, -(-a["prompts"] * a["n"] // servers))
    for running in sorted({min(most, r) for r in (256, 192, 128, 96, 64, 48, 32, 24, 16, 8)}, reverse=True):
        plan = _plan(build(model, algo, fp8, running), nodes)
        if plan.fits and plan.peak_gib <= TARGET_PEAK_GIB:
            static = plan.term("sglang weights") + plan.term("sglang KV cache")
            if algo == "aapo":
                static /= 2  # the planner counts AAPO's two engines; the fraction is per server
            fraction = math.ceil((static / GPU_MEM_GIB + 0.02) * 100) / 100
            cfg = build(model, algo, fp8, running, fraction)
            return cfg, _plan(cfg, nodes)
    raise SystemExit(f"generate: {model}/{algo}: no SGLang concurrency fits the layout in the table "
                     f"under {TARGET_PEAK_GIB} GiB; change its nodes, TP or PP")


def render(model: str, algo: str, fp8: bool) -> tuple[str, str]:
    repo, _, lay = MODELS[model]
    cfg, plan = rollout_settings(model, algo, fp8)
    name = f"{algo}{'-fp8' if fp8 else ''}"
    path = os.path.join(HERE, model, f"{name}.yaml")
    rel = os.path.relpath(path, os.path.dirname(HERE))
    peak = plan.peak_gib
    header = [
        f"# {repo}, {algo.upper()}, {'FP8 (TransformerEngine blockwise; SGLang fp8)' if fp8 else 'bf16'}.",
        "# Generated by examples/generate.py from its tables: edit those, then re-run it.",
        f"# nodes: {lay['nodes']} (8x H100-80GB each; colocated: trainer and SGLang share the GPUs)",
        f"# memory per GPU (groupwise plan): {peak:.1f} GiB of 80",
        f"#   groupwise plan --config {rel} --nodes {lay['nodes']} --gpus-per-node 8 --gpu-mem 80",
        f"# model.hf_config holds {repo}'s config.json fields so the planner needs no download;",
        "# to train, set it to the model directory and data.paths to your prompts:",
        f"#   CONFIG={rel} OVERRIDES='model.hf_config=/models/{repo.split('/')[1]} data.paths=[...]' \\",
        f"#     sbatch --nodes {lay['nodes']} slurm/colocated.sbatch",
    ]
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=100)
    return path, "\n".join(header) + "\n" + body


def outputs():
    for model in MODELS:
        for algo in ALGORITHMS:
            yield render(model, algo, False)
        for algo in FP8_VARIANTS:
            yield render(model, algo, True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a file on disk is out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs():
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(os.path.relpath(path, HERE))
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path, HERE)}")
    if stale:
        print("out of date (run python examples/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
