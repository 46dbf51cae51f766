"""Model provider checks that need no process group: validation messages, FP8 gating, RoPE
scaling, and the SDPA core attention's packed (cu_seqlens) path."""

import math

import pytest
import torch

from megatron_ext.model import (ModelConfig, load_hf_config, padded_vocab_size,
                                validate_fp8, validate_model_layout)

BASE = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def test_heads_not_divisible_by_tp_names_the_field():
    hf = load_hf_config(dict(BASE, num_attention_heads=6, num_key_value_heads=6, hidden_size=96))
    with pytest.raises(ValueError, match="num_attention_heads=6 .*divisible by 4.*tensor_parallel"):
        validate_model_layout(hf, ModelConfig(), tp=4)


def test_query_groups_not_divisible_by_tp():
    hf = load_hf_config(BASE)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        validate_model_layout(hf, ModelConfig(), tp=4)


def test_layers_not_divisible_by_pp():
    hf = load_hf_config(dict(BASE, num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_hidden_layers=3 .*pipeline_parallel"):
        validate_model_layout(hf, ModelConfig(), pp=2)


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf_config(dict(BASE, model_type="gpt2"))


def test_unsupported_model_type_in_a_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(ValueError, match=r"config.json: model_type='mistral'"):
        load_hf_config(tmp_path)


def test_fp8_without_transformer_engine_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model.fp8 .*groupwise\[gpu\]"):
        validate_fp8(ModelConfig(fp8="hybrid"), use_te=False)
    with pytest.raises(ValueError, match="model.fp8_recipe='nvfp4'"):
        validate_fp8(ModelConfig(fp8="e4m3", fp8_recipe="nvfp4"), use_te=True)
    validate_fp8(ModelConfig(fp8="e4m3", fp8_recipe="blockwise"), use_te=True)


def test_bad_params_dtype():
    with pytest.raises(ValueError, match="model.params_dtype='fp16'"):
        validate_model_layout(load_hf_config(BASE), ModelConfig(params_dtype="fp16"))


def test_padded_vocab_is_a_multiple_of_tp_times_divisor():
    assert padded_vocab_size(300, 1, 128) == 384
    assert padded_vocab_size(300, 2, 128) == 512
    assert padded_vocab_size(151936, 8, 128) == 152576


def test_llama3_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_ext.model import rope_inv_freq

    rs = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf = load_hf_config(dict(BASE, hidden_size=512, num_attention_heads=4, rope_scaling=rs,
                             max_position_embeddings=131072))
    ours = rope_inv_freq(hf, 128)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    plain = load_hf_config(dict(BASE, rope_theta=1e6))
    torch.testing.assert_close(rope_inv_freq(plain, 16),
                               1.0 / 1e6 ** (torch.arange(0, 16, 2).float() / 16))


def _attention(**cfg):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.layers import SDPAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, use_cpu_initialization=True,
                               attention_dropout=0.0, **cfg)
    return SDPAttention(config, 1, AttnMaskType.causal, "self")


def test_sdpa_packed_sequences_equal_separate_causal_attention():
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _attention()
    g = torch.Generator().manual_seed(0)
    lens = [3, 5, 1]
    q = torch.randn(sum(lens), 4, 8, generator=g)
    k = torch.randn(sum(lens), 2, 8, generator=g)
    v = torch.randn(sum(lens), 2, 8, generator=g)
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    packed = attn(q, k, v, None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5))
    assert packed.shape == (9, 32)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        # sbhd path of one sequence alone: [s, 1, heads, dim]
        alone = attn(q[a:b, None], k[a:b, None], v[a:b, None], None)
        torch.testing.assert_close(packed[a:b], alone[:, 0], rtol=1e-5, atol=1e-6)


def test_sdpa_matches_explicit_softmax_attention_with_gqa():
    attn = _attention()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(6, 2, h, 8, generator=g) for h in (4, 2, 2))
    out = attn(q, k, v, None)  # [s, b, heads*dim]
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    ref = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv).reshape(6, 2, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, field", [
    (dict(attention_bias=True), "attention_bias"), (dict(mlp_bias=True), "mlp_bias")])
def test_hf_variants_the_model_cannot_represent_are_refused(extra, field):
    with pytest.raises(ValueError, match=f"hf_config.{field}=True is not supported"):
        validate_model_layout(load_hf_config(dict(BASE, **extra)), ModelConfig())


def test_qwen2_sliding_window_is_refused():
    hf = load_hf_config(dict(BASE, model_type="qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="use_sliding_window"):
        validate_model_layout(hf, ModelConfig())
