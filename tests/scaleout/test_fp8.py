"""FP8 is checked as TransformerEngine requires it (megatron_ext.model.validate_fp8): Hopper or
newer, MXFP8 on Blackwell only, GEMM dimensions per TP shard aligned, the recipe class present
in TE; `groupwise plan` runs the same checks against the target GPU from a CPU machine."""

import os
import sys
import types

import pytest

import megatron_ext.model as model_mod
from megatron_ext.model import ModelConfig, load_hf_config, validate_fp8
from pipeline.config import load_job_config, validate
from pipeline.config_io import ConfigError
from pipeline.plan import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "tiny", "grpo.yaml")
QWEN7B = os.path.join(ROOT, "examples", "qwen2.5-7b", "grpo.yaml")

# hidden 64; 8 heads, 2 query groups, head_dim 8: QKV width (8 + 2x2) x 8 = 96, attention
# width 64, intermediate 192.
SMALL = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=192,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)


def _hf(**changes):
    return load_hf_config({**SMALL, **changes})


def test_fp8_needs_hopper():
    with pytest.raises(ValueError, match=r"model.fp8 needs compute capability 9.0\+ \(Hopper or "
                                         r"newer\); the GPU is 8.0: set model.fp8: null"):
        validate_fp8(ModelConfig(fp8="hybrid", fp8_recipe="delayed"), use_te=True, capability=(8, 0))
    validate_fp8(ModelConfig(fp8="hybrid", fp8_recipe="delayed"), use_te=True, capability=(9, 0))


@pytest.mark.parametrize("capability", [(9, 0), (12, 0)])
def test_mxfp8_runs_on_blackwell_only(capability):
    cfg = ModelConfig(fp8="e4m3", fp8_recipe="mxfp8")
    with pytest.raises(ValueError, match=rf"model.fp8_recipe=mxfp8 runs only on compute capability "
                                         rf"10.x \(Blackwell\); the GPU is {capability[0]}.0: use "
                                         rf"model.fp8_recipe: blockwise"):
        validate_fp8(cfg, use_te=True, capability=capability)
    validate_fp8(cfg, use_te=True, capability=(10, 0))


def test_gemm_dimensions_per_tensor_parallel_shard_must_be_multiples_of_16():
    """intermediate 200 / TP 2 = 100 = 6 x 16 + 4; at TP 1, 200 is not a multiple of 16 either."""
    cfg = ModelConfig(fp8="hybrid", fp8_recipe="blockwise")
    with pytest.raises(ValueError) as e:
        validate_fp8(cfg, hf=_hf(intermediate_size=200), tp=2, use_te=True, capability=(9, 0))
    assert str(e.value) == ("model.fp8: intermediate_size / TP = 100 is not a multiple of 16, which "
                            "TransformerEngine's blockwise GEMMs need; choose a "
                            "parallel.tensor_parallel that keeps them aligned, or set model.fp8: null")
    validate_fp8(cfg, hf=_hf(), tp=2, use_te=True, capability=(9, 0))  # 192 / 2 = 96 = 6 x 16


def test_mxfp8_needs_multiples_of_32():
    """At TP 2: QKV width 96 / 2 = 48 and intermediate 192 / 2 = 96 are multiples of 16; only
    96 is one of 32."""
    with pytest.raises(ValueError, match=r"QKV width \(heads \+ 2 x query groups\) x head_dim / TP = 48 "
                                         r"is not a multiple of 32, which TransformerEngine's mxfp8"):
        validate_fp8(ModelConfig(fp8="e4m3", fp8_recipe="mxfp8"), hf=_hf(), tp=2, use_te=True,
                     capability=(10, 0))
    validate_fp8(ModelConfig(fp8="e4m3", fp8_recipe="mxfp8"), hf=_hf(), tp=1, use_te=True,
                 capability=(10, 0))


def test_recipe_class_must_exist_in_the_installed_transformer_engine(monkeypatch):
    """A TE without MXFP8BlockScaling (older than 2.0) cannot run the mxfp8 recipe."""
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.DelayedScaling = object
    te = types.ModuleType("transformer_engine")
    te.__version__ = "1.13.0"
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", types.ModuleType("transformer_engine.common"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe)
    monkeypatch.setattr(model_mod, "te_available", lambda: True)
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model.fp8_recipe=mxfp8 needs transformer_engine.common."
                                         r"recipe.MXFP8BlockScaling, which TransformerEngine 1.13.0 lacks"):
        validate_fp8(ModelConfig(fp8="e4m3", fp8_recipe="mxfp8"))
    validate_fp8(ModelConfig(fp8="hybrid", fp8_recipe="delayed"))


def test_capability_of_this_gpu_is_queried_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_mod.torch.cuda, "get_device_capability", lambda: (8, 6))
    with pytest.raises(ValueError, match="the GPU is 8.6"):
        validate_fp8(ModelConfig(fp8="hybrid"), use_te=True)


def test_fp8_with_the_local_layer_spec_is_refused():
    with pytest.raises(ValueError, match="model.use_te=false selects the local layer spec"):
        validate_fp8(ModelConfig(fp8="hybrid", use_te=False), use_te=True, capability=(9, 0))


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return [f"model.hf_config={os.path.join(tiny_assets, 'model')}",
            f"data.paths=[{os.path.join(tiny_assets, 'train.jsonl')}]"]


def test_validate_for_another_machine_skips_only_this_machines_checks(tiny):
    """The tiny model (hidden 128, QKV 256, attention 128, intermediate 384) is FP8-aligned;
    this CPU machine has no TransformerEngine."""
    cfg = load_job_config(TINY, tiny + ["model.fp8=hybrid", "model.fp8_recipe=blockwise"])
    with pytest.raises(ConfigError, match="TransformerEngine with CUDA is not available"):
        validate(cfg, 1)
    assert validate(cfg, 1, runtime=False)["dp"] == 1
    assert validate(cfg, 1, runtime=False, capability=(9, 0))["dp"] == 1
    with pytest.raises(ConfigError, match="the GPU is 8.0"):
        validate(cfg, 1, runtime=False, capability=(8, 0))


def test_plan_checks_fp8_against_the_target_gpu(capsys):
    args = ["--config", QWEN7B, "--nodes", "1", "model.fp8=e4m3", "model.fp8_recipe=mxfp8"]
    assert main(args) == 2
    assert "model.fp8_recipe=mxfp8 runs only on compute capability 10.x" in capsys.readouterr().err
    assert main(["--compute-capability", "10.0", *args]) == 0
    assert "fp8 e4m3/mxfp8" in capsys.readouterr().out
