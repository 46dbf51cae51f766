"""export_hf_weights over a live model at TP=2 and PP=2 yields exactly the HF state dict:
each tensor once over the export ranks, bit-equal to the HF files, in bounded buckets."""

import pytest
import torch

from .conftest import section
from .tiny_models import read_state_dict

FAMILIES = ["llama", "qwen2", "qwen3"]


def _flat(export):
    return [(n, t) for b in export["buckets"] for n, t in b]


def _assert_equal_to_files(pairs, original):
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), "a tensor was exported twice"
    assert sorted(names) == sorted(original)
    for name, t in pairs:
        assert t.dtype == original[name].dtype, name
        assert torch.equal(t, original[name]), name


@pytest.mark.parametrize("fam", FAMILIES)
def test_tp2_export_gathers_every_tensor_once(checks, hf_dirs, fam):
    rank0 = section(checks, f"family:{fam}", 0)["tp2_export"]
    rank1 = section(checks, f"family:{fam}", 1)["tp2_export"]
    assert (rank0["export_rank"], rank1["export_rank"]) == (True, False)
    assert rank0["export_ranks"] == [0]
    _assert_equal_to_files(_flat(rank0), read_state_dict(hf_dirs[fam]))
    # The other TP rank receives the same full tensors (all-gather), to use or drop.
    assert [n for n, _ in _flat(rank1)] == [n for n, _ in _flat(rank0)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_flat(rank0), _flat(rank1)))


@pytest.mark.parametrize("fam", FAMILIES)
def test_pp2_stages_export_their_own_layers(checks, hf_dirs, fam):
    stage0 = section(checks, f"family:{fam}", 0)["pp2_export"]
    stage1 = section(checks, f"family:{fam}", 1)["pp2_export"]
    assert stage0["export_rank"] and stage1["export_rank"]
    assert stage0["export_ranks"] == [0, 1]
    names0, names1 = {n for n, _ in _flat(stage0)}, {n for n, _ in _flat(stage1)}
    assert not names0 & names1
    _assert_equal_to_files(_flat(stage0) + _flat(stage1), read_state_dict(hf_dirs[fam]))
    # 4 layers over 2 stages, under their GLOBAL index.
    assert "model.embed_tokens.weight" in names0 and "model.layers.1.mlp.up_proj.weight" in names0
    assert "model.norm.weight" in names1 and "model.layers.2.mlp.up_proj.weight" in names1
    assert not any(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names0)
    # Tied (qwen2): the last stage's copy of the embedding is not exported.
    assert ("lm_head.weight" in names1) == (fam != "qwen2")


@pytest.mark.parametrize("fam", FAMILIES)
def test_pp2_gathered_export_reaches_every_rank(checks, hf_dirs, fam):
    rank0 = section(checks, f"family:{fam}", 0)["pp2_export_gathered"]
    rank1 = section(checks, f"family:{fam}", 1)["pp2_export_gathered"]
    assert (rank0["export_rank"], rank1["export_rank"], rank0["export_ranks"]) == (True, False, [0])
    original = read_state_dict(hf_dirs[fam])
    _assert_equal_to_files(_flat(rank0), original)
    _assert_equal_to_files(_flat(rank1), original)


def test_interleaved_pipeline_gathered_export_is_the_hf_state_dict(checks, hf_dirs):
    original = read_state_dict(hf_dirs["qwen2"])
    for rank in (0, 1):
        _assert_equal_to_files(_flat(section(checks, "vpp", rank)["export_gathered"]), original)


@pytest.mark.parametrize("key", ["tp2_export", "pp2_export", "pp2_export_gathered"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_buckets_are_bounded(checks, fam, key):
    export = section(checks, f"family:{fam}")[key]
    limit = export["bucket_bytes"]  # 40 kB: the 77 kB embedding must travel alone
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in export["buckets"]]
    assert all(s <= limit or len(b) == 1 for s, b in zip(sizes, export["buckets"]))
    assert any(len(b) > 1 for b in export["buckets"]) and len(sizes) > 3
    assert any(s > limit for s in sizes)  # the oversized tensor, alone
