"""The planner (`groupwise plan`): parameter counts equal the real models', memory terms equal
what megatron-core allocates for the tiny model, and a layout that cannot fit fails naming its
largest term and a change that fits."""

import os

import pytest
import torch

from megatron_ext.multirank import run_ranks
from pipeline.config import load_job_config
from pipeline.plan import Hardware, estimate, main, param_count

from .memory_job import measure_job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "tiny", "grpo.yaml")
QWEN7B = os.path.join(ROOT, "examples", "qwen2.5-7b", "grpo.yaml")

SMALL = {
    # Qwen2: QKV bias, untied head
    "qwen2": dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=176,
                  num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                  tie_word_embeddings=False),
    # Llama: tied embeddings, GQA, the optional attention and MLP biases
    "llama": dict(model_type="llama", vocab_size=777, hidden_size=96, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                  tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # Qwen3: QK-norm and a head_dim that is not hidden / heads
    "qwen3": dict(model_type="qwen3", vocab_size=1500, hidden_size=80, intermediate_size=200,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=False),
}


def _hf(fields):
    from megatron_ext.model import load_hf_config

    return load_hf_config(dict(fields))


@pytest.mark.parametrize("family", sorted(SMALL))
def test_param_count_equals_transformers_model(family):
    from transformers import AutoModelForCausalLM

    hf = _hf(SMALL[family])
    model = AutoModelForCausalLM.from_config(hf)
    real = sum(p.numel() for p in model.parameters())
    assert param_count(hf) == real


def test_param_count_of_every_example_model_within_1_percent():
    """The example models at full size, built on the meta device (no memory)."""
    import sys

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from generate import MODELS

    for name, (_, fields, _) in MODELS.items():
        hf = _hf(fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
        real = sum(p.numel() for p in model.parameters())
        assert abs(param_count(hf) - real) <= 0.01 * real, name


def test_published_sizes():
    """Worked numbers: Qwen2.5-7B is 7.62B parameters, Llama-3.1-70B 70.55B."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from generate import MODELS

    assert param_count(_hf(MODELS["qwen2.5-7b"][1])) == 7_615_616_512
    assert param_count(_hf(MODELS["llama3.1-70b"][1])) == 70_553_706_496


@pytest.mark.parametrize("params_dtype,distributed,world", [("fp32", False, 1), ("bf16", True, 2)])
def test_resident_memory_matches_megatron_within_20_percent(tiny_assets, params_dtype, distributed, world):
    """Tiny model on CPU: parameters, DDP grad buffer and optimizer state (fp32 master weights
    and Adam moments, sharded over DP 2 with the distributed optimizer) after one real step."""
    cfg = load_job_config(TINY, [f"model.hf_config={os.path.join(tiny_assets, 'model')}",
                                 f"data.paths=[{os.path.join(tiny_assets, 'train.jsonl')}]",
                                 f"model.params_dtype={params_dtype}",
                                 f"optimizer.use_distributed_optimizer={str(distributed).lower()}",
                                 "rollout.prompts_per_step=32"])
    plan = estimate(cfg, Hardware(nodes=1, gpus_per_node=world, colocated=False))
    measured = run_ranks(measure_job, world, cfg.model.hf_config, params_dtype, distributed,
                         timeout=400)[0]
    for term in ("parameters", "gradients", "optimizer state"):
        planned = plan.term(term) * (1 << 30)
        assert abs(planned - measured[term]) <= 0.2 * measured[term], (term, planned, measured[term])
    total_planned = sum(plan.term(t) for t in measured) * (1 << 30)
    assert abs(total_planned - sum(measured.values())) <= 0.2 * sum(measured.values())


def test_distributed_optimizer_shards_state_over_data_parallel():
    one = estimate(load_job_config(QWEN7B, ["parallel.tensor_parallel=4"]), Hardware(nodes=1))
    two = estimate(load_job_config(QWEN7B, ["parallel.tensor_parallel=4"]), Hardware(nodes=2))
    assert one.term("parameters") == pytest.approx(two.term("parameters"))
    assert one.term("optimizer state") == pytest.approx(2 * two.term("optimizer state"))


def test_example_fits_and_exits_zero(capsys):
    assert main(["--config", QWEN7B, "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "sglang KV cache" in out and "activations" in out


def test_oversized_layout_fails_naming_the_largest_term_and_a_fix(capsys):
    """Qwen2.5-7B on one node with TP=1 and a replicated optimizer: 16 bytes per parameter
    per GPU before any activation."""
    rc = main(["--config", QWEN7B, "--nodes", "1", "parallel.tensor_parallel=1",
               "parallel.sequence_parallel=false", "optimizer.use_distributed_optimizer=false"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out
    assert "the largest term is optimizer state" in out
    assert "a change that fits: " in out and "(peak " in out


def test_activation_bound_layout_suggests_recompute(capsys):
    rc = main(["--config", QWEN7B, "--nodes", "1", "model.recompute_granularity=null",
               "trainer.micro_batch_tokens=32768", "--no-colocated"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "the largest term is activations" in out
    assert "a change that fits: model.recompute_granularity=full" in out


def test_indivisible_heads_is_a_config_error(capsys):
    rc = main(["--config", QWEN7B, "--nodes", "1", "parallel.tensor_parallel=8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "num_attention_heads=28 is not divisible by 8" in err


def test_batch_not_divisible_by_data_parallel_is_a_config_error(capsys):
    rc = main(["--config", QWEN7B, "--nodes", "1", "rollout.prompts_per_step=250"])
    assert rc == 2
    assert "rollout.prompts_per_step=250 is not divisible by the data-parallel size 4" in capsys.readouterr().err


def test_fp8_rollout_with_tis_turned_off_warns():
    """bf16 training, fp8 SGLang rollout: TIS is on by default; turning it off is a warning."""
    fp8_rollout = "rollout.sglang.extra_args=[--quantization, fp8]"
    assert estimate(load_job_config(QWEN7B, [fp8_rollout]), Hardware(nodes=1)).warnings == []
    plan = estimate(load_job_config(QWEN7B, [fp8_rollout, "algorithm.tis=null"]), Hardware(nodes=1))
    assert any("algorithm.tis: null turns off the correction" in w for w in plan.warnings)
