"""The per-family tables on full tensors: the grouped QKV layout, TE names, refusal of
features the Megatron model cannot hold, tied embeddings and vocabulary padding."""

import pytest
import torch

from megatron_ext.hf.mapping import (EMBEDDING, HFMapping, WeightMismatchError, fuse_qkv,
                                     split_qkv)

from .tiny_models import FAMILIES


def test_qkv_grouped_layout_worked_example():
    # 4 query heads, 2 groups, head_dim 1: group g holds its 2 query heads, then k_g, then v_g.
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    fused = fuse_qkv(q, k, v, ng=2, hn=1)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 4, 2, 1), (q, k, v)))


def test_qkv_bias_and_wide_heads_round_trip():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * 32, generator=g) for n in (8, 2, 2))  # np=8, ng=2, hn=32, bias
    fused = fuse_qkv(q, k, v, ng=2, hn=32)
    assert fused.shape == (12 * 32,)
    assert torch.equal(fused[: 4 * 32], q[: 4 * 32])  # group 0's four query heads lead
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 8, 2, 32), (q, k, v)))


def test_transformer_engine_names_resolve_to_the_same_rows():
    m = HFMapping(FAMILIES["qwen3"])
    pairs = [("decoder.layers.3.input_layernorm.weight",
              "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"),
             ("decoder.layers.0.pre_mlp_layernorm.weight",
              "decoder.layers.0.mlp.linear_fc1.layer_norm_weight")]
    for local, te in pairs:
        assert m.resolve(local) == m.resolve(te)
    row, layer = m.resolve("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
    assert (m.hf_names(row, layer), layer) == (["model.layers.3.input_layernorm.weight"], 3)
    row, _ = m.resolve("decoder.layers.1.self_attention.k_layernorm.weight")
    assert m.hf_names(row, 1) == ["model.layers.1.self_attn.k_norm.weight"]


def test_unknown_megatron_parameter_is_named():
    m = HFMapping(FAMILIES["llama"])
    with pytest.raises(WeightMismatchError, match="'decoder.layers.0.self_attention.q_layernorm.weight'.*llama"):
        m.resolve("decoder.layers.0.self_attention.q_layernorm.weight")  # QK-norm is Qwen3's
    with pytest.raises(WeightMismatchError, match="layer 4 is outside num_hidden_layers=4"):
        m.resolve("decoder.layers.4.mlp.linear_fc2.weight")


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_biases_the_megatron_model_lacks_are_refused(field):
    with pytest.raises(WeightMismatchError, match=field):
        HFMapping(dict(FAMILIES["llama"], **{field: True}))


def test_qwen2_has_qkv_bias_and_tied_head():
    shapes = HFMapping(FAMILIES["qwen2"]).hf_shapes()
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (32,)
    assert "lm_head.weight" not in shapes


def test_tied_checkpoint_may_carry_a_correct_lm_head_only():
    m = HFMapping(FAMILIES["qwen2"])
    shapes = m.hf_shapes()
    m.check_hf_tensors(dict(shapes, **{"lm_head.weight": (300, 64)}), "ckpt")
    with pytest.raises(WeightMismatchError, match=r"lm_head\.weight has shape \(299, 64\)"):
        m.check_hf_tensors(dict(shapes, **{"lm_head.weight": (299, 64)}), "ckpt")


def test_vocabulary_is_padded_with_zero_rows_and_unpadded_on_export():
    m = HFMapping(FAMILIES["llama"])
    emb = torch.randn(300, 64)
    full = m.from_hf(EMBEDDING, None, [emb], padded_vocab=384)
    assert full.shape == (384, 64) and torch.equal(full[:300], emb) and not full[300:].any()
    ((name, back),) = m.to_hf(EMBEDDING, None, full)
    assert name == "model.embed_tokens.weight" and torch.equal(back, emb)
    with pytest.raises(WeightMismatchError, match="padded vocabulary 256 is smaller"):
        m.from_hf(EMBEDDING, None, [emb], padded_vocab=256)
