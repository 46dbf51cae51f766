"""Model provider: a Hugging Face config becomes a TransformerConfig, a layer spec and a GPTModel.

Families: Llama 2/3/3.1 (llama3 RoPE scaling), Qwen2/Qwen2.5 (QKV bias), Qwen3 dense (QK-norm);
GQA, tied or untied embeddings, RMSNorm eps, rope theta. The TransformerEngine layer spec is
used when TE imports and CUDA is present; otherwise the local spec with
:class:`megatron_ext.layers.SDPAttention` and torch norms.

Validation (:func:`validate_model_layout`) runs before any process group exists and names
the offending field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
FP8_FORMATS = ("e4m3", "hybrid")
# megatron-core's fp8_recipe names -> the TransformerEngine recipe class each one builds.
FP8_RECIPE_CLASSES = {"delayed": "DelayedScaling", "tensorwise": "Float8CurrentScaling",
                      "blockwise": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}
FP8_RECIPES = tuple(FP8_RECIPE_CLASSES)
FP8_MIN_CAPABILITY = (9, 0)  # FP8 tensor cores: Hopper or newer
MXFP8_CAPABILITY_MAJOR = 10  # MXFP8 block scaling runs on Blackwell (10.x) only
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ModelConfig:
    """What to build. ``hf_config`` is a path to a HF model dir/config.json or a config dict."""

    hf_config: Any = None
    params_dtype: str = "fp32"  # fp32 | bf16
    fp8: str | None = None  # None | e4m3 | hybrid (TransformerEngine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    make_vocab_size_divisible_by: int = 128  # padded vocab = multiple of this * TP
    recompute_granularity: str | None = None  # None | full | selective
    recompute_num_layers: int = 1
    use_te: bool | None = None  # None: TE when importable and CUDA present
    extra: dict = field(default_factory=dict)  # other TransformerConfig fields, passed through


def load_hf_config(source: Any):
    """A transformers PretrainedConfig from a model dir, a config.json path, a dict or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        d = dict(source)
        model_type = d.pop("model_type", None)
        _check_model_type(model_type, "hf_config")
        return AutoConfig.for_model(model_type, **d)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        cfg_file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"model.hf_config: no config.json at {cfg_file}")
        with open(cfg_file) as f:
            d = json.load(f)
        _check_model_type(d.get("model_type"), cfg_file)
        return AutoConfig.from_pretrained(os.path.dirname(cfg_file) if path.endswith(".json") else path)
    raise ValueError(f"model.hf_config: expected a path or dict, got {type(source).__name__}")


def _check_model_type(model_type, where):
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: model_type={model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest size >= vocab_size divisible by ``divisible_by * tp`` (Megatron's rule)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def te_available() -> bool:
    """TransformerEngine importable and CUDA present. Never imports TE on a CPU machine, where
    an installed TE would crash (see megatron-on-cpu facts)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def validate_model_layout(hf, model_cfg: ModelConfig, *, tp: int = 1, pp: int = 1, cp: int = 1,
                          vpp: int | None = None, sequence_parallel: bool = False,
                          use_te: bool | None = None,
                          capability: tuple[int, int] | None = None) -> None:
    """Check a HF config against a parallel layout before any process group starts.

    ``use_te`` and ``capability`` go to :func:`validate_fp8` (None: this machine's).
    Raises ValueError naming the field and the fix.
    """
    _check_model_type(getattr(hf, "model_type", None), "hf_config")
    if vpp is not None and (vpp < 1 or (vpp > 1 and pp == 1)):
        raise ValueError(f"parallel.virtual_pipeline={vpp} needs parallel.pipeline_parallel > 1 "
                         "and a value >= 1 (model chunks per pipeline rank); leave it unset "
                         "without pipeline parallelism")
    layers_knob = "parallel.pipeline_parallel" + (" x parallel.virtual_pipeline" if vpp and vpp > 1 else "")
    checks = [
        ("num_attention_heads", hf.num_attention_heads, tp, "parallel.tensor_parallel"),
        ("num_key_value_heads", getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
         tp, "parallel.tensor_parallel"),
        ("intermediate_size", hf.intermediate_size, tp, "parallel.tensor_parallel"),
        ("num_hidden_layers", hf.num_hidden_layers, pp * (vpp or 1), layers_knob),
    ]
    for name, value, by, knob in checks:
        if value % by:
            raise ValueError(f"hf_config.{name}={value} is not divisible by {by} "
                             f"({knob}); choose a {knob} that divides it")
    # Variants the Megatron model here cannot represent: refuse rather than train a different
    # network than the checkpoint describes.
    if hf.model_type in ("llama", "qwen3") and getattr(hf, "attention_bias", False):
        raise ValueError(f"hf_config.attention_bias=True is not supported for {hf.model_type} "
                         "(it also adds an o_proj bias the Megatron model lacks)")
    if getattr(hf, "mlp_bias", False):
        raise ValueError("hf_config.mlp_bias=True is not supported (no MLP biases in the model)")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("hf_config.use_sliding_window=True is not supported (full attention only)")
    if sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel=True needs parallel.tensor_parallel > 1")
    if model_cfg.params_dtype not in PARAM_DTYPES:
        raise ValueError(f"model.params_dtype={model_cfg.params_dtype!r}: expected one of "
                         f"{', '.join(PARAM_DTYPES)}")
    validate_fp8(model_cfg, hf=hf, tp=tp, use_te=use_te, capability=capability)
    rs = _rope_params(hf)
    rope_type = rs.get("rope_type", rs.get("type")) if rs else None
    if rope_type not in (None, "default", "llama3"):
        raise ValueError(f"hf_config.rope_scaling.rope_type={rope_type!r} is not supported "
                         "(supported: default, llama3)")


def fp8_alignment(recipe: str) -> int:
    """The multiple TransformerEngine's FP8 GEMMs need in every dimension, the token count
    included: 32 for MXFP8 (its scales cover blocks of 32 elements), 16 for the other recipes."""
    return 32 if recipe == "mxfp8" else 16


def validate_fp8(model_cfg: ModelConfig, *, hf=None, tp: int = 1, use_te: bool | None = None,
                 capability: tuple[int, int] | None = None) -> None:
    """What TransformerEngine needs for ``model.fp8``; raises ValueError naming the field and
    the fix.

    - format and recipe names; TE present (``use_te=None``: on this machine, and then its
      ``transformer_engine.common.recipe`` must have the recipe's class; ``use_te=True``:
      the caller plans for a machine that has TE, this one's is not consulted);
    - compute capability 9.0+ (Hopper) for any FP8 recipe, 10.x (Blackwell) for ``mxfp8``.
      ``capability=None``: this machine's GPU when CUDA is available; without CUDA the check
      is skipped only when ``use_te`` was given (planning for another machine);
    - with ``hf``: every GEMM dimension of one TP shard a multiple of 16 (32 for ``mxfp8``,
      whose scales cover blocks of 32 elements): hidden size, QKV and attention widths / TP,
      intermediate size / TP. The embedding and the output layer are not TE modules and stay
      in bf16, so the vocabulary needs no alignment.
    """
    if model_cfg.fp8 is None:
        return
    if model_cfg.fp8 not in FP8_FORMATS:
        raise ValueError(f"model.fp8={model_cfg.fp8!r}: expected one of {', '.join(FP8_FORMATS)} or null")
    recipe = model_cfg.fp8_recipe
    if recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={recipe!r}: expected one of {', '.join(FP8_RECIPES)}")
    if model_cfg.use_te is False:
        raise ValueError("model.fp8 needs TransformerEngine, but model.use_te=false selects the "
                         "local layer spec; set model.use_te: null, or model.fp8: null")
    te = te_available() if use_te is None else use_te
    if not te:
        raise ValueError("model.fp8 is set but TransformerEngine with CUDA is not available; "
                         "install the gpu extra (pip install 'groupwise[gpu]') on a CUDA machine "
                         "or set model.fp8: null")
    if use_te is None:
        _check_te_recipe(recipe)
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    if capability is not None:
        _check_fp8_capability(recipe, tuple(capability))
    if hf is not None:
        _check_fp8_alignment(hf, recipe, tp)


def _check_te_recipe(recipe: str) -> None:
    """This machine's TE (importable: te_available() said so) has the recipe's class."""
    import importlib

    module = importlib.import_module("transformer_engine.common.recipe")
    name = FP8_RECIPE_CLASSES[recipe]
    if not hasattr(module, name):
        version = getattr(importlib.import_module("transformer_engine"), "__version__", "?")
        raise ValueError(f"model.fp8_recipe={recipe} needs transformer_engine.common.recipe.{name}, "
                         f"which TransformerEngine {version} lacks; upgrade TransformerEngine or "
                         f"choose another model.fp8_recipe")


def _check_fp8_capability(recipe: str, capability: tuple[int, int]) -> None:
    have = f"{capability[0]}.{capability[1]}"
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(f"model.fp8 needs compute capability {FP8_MIN_CAPABILITY[0]}."
                         f"{FP8_MIN_CAPABILITY[1]}+ (Hopper or newer); the GPU is {have}: "
                         "set model.fp8: null to train in bf16")
    if recipe == "mxfp8" and capability[0] != MXFP8_CAPABILITY_MAJOR:
        raise ValueError(f"model.fp8_recipe=mxfp8 runs only on compute capability "
                         f"{MXFP8_CAPABILITY_MAJOR}.x (Blackwell); the GPU is {have}: "
                         "use model.fp8_recipe: blockwise (or tensorwise, delayed)")


def _check_fp8_alignment(hf, recipe: str, tp: int) -> None:
    align = fp8_alignment(recipe)
    heads = hf.num_attention_heads
    groups = getattr(hf, "num_key_value_heads", None) or heads
    d = head_dim(hf)
    dims = {"hidden_size": hf.hidden_size,
            "QKV width (heads + 2 x query groups) x head_dim / TP": (heads + 2 * groups) * d / tp,
            "attention width heads x head_dim / TP": heads * d / tp,
            "intermediate_size / TP": hf.intermediate_size / tp}
    bad = [f"{name} = {value:g}" for name, value in dims.items()
           if value != int(value) or int(value) % align]
    if bad:
        raise ValueError(f"model.fp8: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a "
                         f"multiple of {align}, which TransformerEngine's {recipe} GEMMs need; "
                         "choose a parallel.tensor_parallel that keeps them aligned, or set "
                         "model.fp8: null")


def build_transformer_config(hf, model_cfg: ModelConfig, *, tp: int = 1, pp: int = 1, cp: int = 1,
                             vpp: int | None = None, sequence_parallel: bool = False):
    """HF config + layout -> megatron-core TransformerConfig (CPU-required fields applied)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from . import cpu_compat

    validate_model_layout(hf, model_cfg, tp=tp, pp=pp, cp=cp, vpp=vpp,
                          sequence_parallel=sequence_parallel)
    dtype = PARAM_DTYPES[model_cfg.params_dtype]
    kwargs = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        kv_channels=head_dim(hf),
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=hf.model_type == "qwen2",  # Qwen2 has QKV bias by design
        qk_layernorm=hf.model_type == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf, "initializer_range", 0.02),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if (vpp or 1) > 1 else None,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method="uniform" if model_cfg.recompute_granularity == "full" else None,
        recompute_num_layers=(model_cfg.recompute_num_layers
                              if model_cfg.recompute_granularity == "full" else None),
    )
    if pp > 1:
        kwargs["pipeline_dtype"] = dtype
    if model_cfg.fp8 is not None:
        kwargs.update(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe)
    if not torch.cuda.is_available():
        kwargs.update(cpu_compat.cpu_model_config_overrides(pp, dtype))
    kwargs.update(model_cfg.extra)
    config = TransformerConfig(**kwargs)
    cpu_compat.check_config(config)
    return config


def layer_spec(config, use_te: bool | None = None, vp_stage: int | None = None):
    """Spec of this stage's decoder: TE layer spec when available (or forced), else a
    TransformerBlockSubmodules of local layers with SDPA attention and SP-aware torch norms
    (including the final norm, which Megatron would otherwise build as WrappedTorchNorm)."""
    use_te = te_available() if use_te is None else use_te
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .layers import SDPAttention, TorchNorm, TorchQKNorm

    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = TorchNorm
    sub.pre_mlp_layernorm = TorchNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAttention
    if config.qk_layernorm:
        attn.q_layernorm = TorchQKNorm
        attn.k_layernorm = TorchQKNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build)

    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TorchNorm)


def build_gpt_model(hf, config, model_cfg: ModelConfig, *, pre_process: bool = True,
                    post_process: bool = True, vp_stage: int | None = None):
    """GPTModel for this rank's pipeline stage; logits stay sharded over TP (``parallel_output``)."""
    from megatron.core.models.gpt import GPTModel

    tp = config.tensor_model_parallel_size
    rs = _rope_params(hf)
    llama3 = rs.get("rope_type", rs.get("type")) == "llama3"
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, model_cfg.use_te, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(hf.vocab_size, tp, model_cfg.make_vocab_size_divisible_by),
        max_sequence_length=hf.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(_rope_theta(hf)),
        rope_scaling=llama3,
        rope_scaling_factor=float(rs.get("factor", 8.0)) if llama3 else 8.0,
        vp_stage=vp_stage,
    )
    if llama3:
        # Megatron hard-codes low/high frequency factors 1/4 and 8192 original positions; take
        # the checkpoint's own values so Llama 3.x variants with other settings stay exact.
        rot = model.rotary_pos_emb
        rot.inv_freq = rope_inv_freq(hf, config.kv_channels).to(rot.inv_freq.device)
    return model


def rope_inv_freq(hf, head_dim_: int) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] fp32, with llama3 scaling when the config has it."""
    inv = 1.0 / (_rope_theta(hf) ** (torch.arange(0, head_dim_, 2, dtype=torch.float32) / head_dim_))
    rs = _rope_params(hf)
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return inv
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, and the
    # band between the two is interpolated linearly in 1/wavelength (Llama 3.1 report).
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _rope_params(hf) -> dict:
    """RoPE settings: transformers 5 keeps them in ``rope_parameters`` (``rope_scaling`` is an
    alias); older configs have ``rope_scaling`` plus a top-level ``rope_theta``."""
    return dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})


def _rope_theta(hf) -> float:
    theta = _rope_params(hf).get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0
    return float(theta)


def model_provider(hf, config, model_cfg: ModelConfig):
    """A ``model_provider_func(pre_process, post_process, vp_stage=None)`` for megatron-style
    builders, e.g. ``megatron_ext.train.build_model``."""

    def provide(pre_process=True, post_process=True, vp_stage=None):
        return build_gpt_model(hf, config, model_cfg, pre_process=pre_process,
                               post_process=post_process, vp_stage=vp_stage)

    return provide
