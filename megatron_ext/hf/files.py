"""Hugging Face checkpoint files: strict lazy reading of (sharded) safetensors, sharded
writing with an index, and the config/generation-config/tokenizer files that travel along.

Reading validates every file's header before any tensor is touched, so a truncated or
garbled file is reported by name (:class:`CorruptCheckpointError`) before work starts.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping

import torch

INDEX_NAME = "model.safetensors.index.json"
# Weight files and their indices are never copied as "metadata"; everything else at the top
# level of a HF model dir (config, generation config, tokenizer, chat template) is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf",
                    ".onnx", ".distcp")
_WEIGHT_INDICES = (INDEX_NAME, "pytorch_model.bin.index.json")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read as what it claims to be (names the file)."""


def read_header(path: str) -> dict[str, dict]:
    """Tensor entries (``dtype``, ``shape``, ``data_offsets``) of one safetensors file.

    Raises :class:`CorruptCheckpointError` naming the file when it is shorter than its header
    says (an interrupted download or copy), or the header is not valid safetensors JSON.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated: {size} bytes, not even a "
                                         "safetensors header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptCheckpointError(f"{path} is truncated: its header claims {n} bytes but "
                                         f"the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    header.pop("__metadata__", None)
    have = size - 8 - n
    need = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if need > have:
        raise CorruptCheckpointError(f"{path} is truncated: its header describes {need} bytes of "
                                     f"tensor data but the file holds {have}")
    return header


class SafetensorsCheckpoint(Mapping):
    """Read-only, lazy ``{hf_name: tensor}`` view of a HF model directory's safetensors.

    Uses ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file at the
    top level. All headers are validated up front; :attr:`shapes` and :attr:`dtypes` are known
    without reading data, and ``ckpt[name]`` reads one tensor (CPU) from its file.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CorruptCheckpointError(f"{index}: not a safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (PyTorch .bin "
                                    "checkpoints are not supported: re-save with safetensors)")
        self._where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} lists {name}, which does not exist")
            for tensor, entry in read_header(path).items():
                if tensor in self._where:
                    raise CorruptCheckpointError(f"tensor {tensor} is stored twice: in "
                                                 f"{self._where[tensor]} and {path}")
                if entry["dtype"] not in DTYPES:
                    raise CorruptCheckpointError(f"{path}: tensor {tensor} has unsupported dtype "
                                                 f"{entry['dtype']}")
                self._where[tensor] = path
                self.shapes[tensor] = tuple(entry["shape"])
                self.dtypes[tensor] = DTYPES[entry["dtype"]]
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if self._where.get(tensor) != os.path.join(model_dir, name):
                    raise CorruptCheckpointError(f"{index} maps tensor {tensor} to {name}, but "
                                                 "that file does not hold it")
        self._handles: dict[str, object] = {}

    def file_of(self, name: str) -> str:
        return self._where[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt")
        return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._handles.clear()


class ShardedSafetensorsWriter:
    """Writes ``(hf_name, tensor)`` buckets as ``model-0000k-of-0000n.safetensors`` files plus
    ``model.safetensors.index.json`` — one shard per :meth:`write_shard` call, written as it
    arrives (:func:`write_safetensors`), so memory stays at one bucket. Shards are written
    under provisional names and renamed by :meth:`close`, once their count is known.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._shards: list[tuple[str, list[str]]] = []
        self._total = 0

    def write_shard(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = []
        for name, t in pairs:
            t = t.detach().to("cpu").contiguous()
            if t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors here")
            tensors.append((name, t))
            self._total += t.numel() * t.element_size()
        if not tensors:
            return
        tmp = f"shard-{len(self._shards):05d}.safetensors.partial"
        write_safetensors(os.path.join(self.out_dir, tmp), tensors)
        self._shards.append((tmp, [n for n, _ in tensors]))

    def close(self) -> dict:
        """Rename the shards to their final names and write the index; returns the index."""
        n = len(self._shards)
        weight_map = {}
        for k, (tmp, names) in enumerate(self._shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
        return index


def write_safetensors(path: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Write contiguous CPU tensors as one safetensors file, in the given order, straight from
    their memory (``safetensors.torch.save_file`` first copies every tensor into a bytes
    object). Format: little-endian u64 header length, JSON header padded to 8 bytes, data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        if name in header:
            raise ValueError(f"tensor {name} written twice")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def metadata_files(model_dir: str) -> list[str]:
    """Top-level non-weight files of a HF model dir: config.json, generation_config.json,
    tokenizer files, chat template..."""
    out = []
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if (os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES)
                and name not in _WEIGHT_INDICES and not name.startswith(".")):
            out.append(name)
    return out


def copy_metadata_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy :func:`metadata_files` of ``src_dir`` into ``dst_dir``; returns their names."""
    names = metadata_files(src_dir)
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return names


def set_config_dtype(config_path: str, dtype: torch.dtype) -> None:
    """Record the dtype the weights are stored in, under the key the config already uses
    (transformers 5 writes ``dtype``, older versions ``torch_dtype``)."""
    with open(config_path) as f:
        cfg = json.load(f)
    name = str(dtype).removeprefix("torch.")
    key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
    if cfg.get(key) != name:
        cfg[key] = name
        with open(config_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
