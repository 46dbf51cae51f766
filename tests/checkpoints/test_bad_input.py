"""Bad input to the converters: each a clear error naming the tensor or file, raised before
any rank starts, and nothing left behind (no output, no temporary directory)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint import staged_directory
from megatron_ext.hf.files import CorruptCheckpointError
from megatron_ext.hf.mapping import WeightMismatchError
from tools import convert_hf_to_megatron, convert_megatron_to_hf


@pytest.fixture
def src(hf_dirs, tmp_path):
    """A private copy of the tiny qwen2 model to damage."""
    return shutil.copytree(hf_dirs["qwen2"], tmp_path / "src")


def _rewrite(src, edit):
    """Apply ``edit(state_dict)`` and store the result as one unindexed model.safetensors."""
    sd = {}
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(src, name)))
            os.remove(os.path.join(src, name))
    os.remove(os.path.join(src, "model.safetensors.index.json"))
    edit(sd)
    save_file(sd, os.path.join(src, "model.safetensors"))


def _convert(src, out, *extra):
    return convert_hf_to_megatron.main(["--hf", str(src), "--out", str(out), *extra])


def _nothing_left(out):
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]


def test_unknown_model_type_names_config(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"config.json: model_type='gpt2' is not supported"):
        _convert(src, out)
    _nothing_left(out)


def test_missing_tensor_is_named(src, tmp_path):
    _rewrite(src, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "out"
    with pytest.raises(WeightMismatchError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        _convert(src, out)
    _nothing_left(out)


def test_extra_tensor_is_named(src, tmp_path):
    _rewrite(src, lambda sd: sd.update({"model.layers.4.mlp.up_proj.weight": torch.zeros(96, 64)}))
    out = tmp_path / "out"
    with pytest.raises(WeightMismatchError, match=r"unexpected tensor.*model\.layers\.4\.mlp\.up_proj\.weight"):
        _convert(src, out)
    _nothing_left(out)


def test_shape_mismatch_is_named(src, tmp_path):
    _rewrite(src, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    out = tmp_path / "out"
    with pytest.raises(WeightMismatchError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has "
                                                   r"shape \(64, 64\), expected \(32, 64\)"):
        _convert(src, out)
    _nothing_left(out)


def test_truncated_safetensors_names_the_file(src, tmp_path):
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    path = src / shard
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError, match=rf"{shard} is truncated"):
        _convert(src, out)
    _nothing_left(out)


def test_existing_output_is_refused_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out already exists; pass --force"):
        _convert(src, out)
    with pytest.raises(FileExistsError, match=r"out already exists; pass --force"):
        convert_megatron_to_hf.main(["--ckpt", str(src), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"


def test_megatron_side_errors_name_the_directory(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"src is not a Megatron dist checkpoint"):
        convert_megatron_to_hf.main(["--ckpt", str(src), "--out", str(out)])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no HF config .*pass --hf-config"):
        convert_megatron_to_hf.main(["--ckpt", str(ckpt), "--out", str(out)])
    (ckpt / "groupwise.json").write_text(json.dumps({"kind": "model", "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"holds a llama model but .*model_type='qwen2'"):
        convert_megatron_to_hf.main(["--ckpt", str(ckpt), "--out", str(out), "--hf-config", str(src)])
    _nothing_left(out)


def test_staged_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with staged_directory(str(out), force=True) as tmp:
            (open(os.path.join(tmp, "new.txt"), "w")).write("partial")
            raise RuntimeError("crash")
    assert os.listdir(out) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    with staged_directory(str(out), force=True) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert os.listdir(out) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
