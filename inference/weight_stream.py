"""The weight stream between trainer and engines: `(hf_name, tensor)` pairs, in buckets.

The exporter (``megatron_ext``) yields buckets of full HF-named tensors; tests and
small tools often have a flat iterator of pairs or a state dict. :func:`iter_buckets`
accepts all of them and yields lists of pairs, so every engine consumes one shape.
Nothing here imports ``megatron_ext``: the stream is the interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

NamedTensor = tuple[str, torch.Tensor]

DEFAULT_BUCKET_BYTES = 512 << 20


def _is_pair(item) -> bool:
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
    )


def _as_pairs(bucket, position: int) -> list[NamedTensor]:
    pairs = list(bucket.items()) if isinstance(bucket, Mapping) else list(bucket)
    for pair in pairs:
        if not _is_pair(pair):
            raise TypeError(
                f"weight stream item {position} holds {type(pair).__name__} {str(pair)[:80]!r}; "
                "expected (hf_name: str, tensor: torch.Tensor) pairs"
            )
    return pairs


def iter_buckets(stream, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[NamedTensor]]:
    """Normalise a weight stream to buckets (lists) of ``(hf_name, tensor)`` pairs.

    ``stream`` may be a state dict (name -> tensor), an iterable of pairs (grouped here
    into buckets of at most ``bucket_bytes``, a single larger tensor gets its own
    bucket), or an iterable of buckets (each a list of pairs or a dict), whose grouping
    is kept as the exporter chose it. The stream is consumed lazily, one bucket at a time.
    """
    if isinstance(stream, Mapping):
        stream = stream.items()
    pending: list[NamedTensor] = []
    pending_bytes = 0
    for position, item in enumerate(stream):
        if _is_pair(item):
            size = item[1].numel() * item[1].element_size()
            if pending and pending_bytes + size > bucket_bytes:
                yield pending
                pending, pending_bytes = [], 0
            pending.append(item)
            pending_bytes += size
            continue
        if pending:
            yield pending
            pending, pending_bytes = [], 0
        if isinstance(item, (str, bytes, torch.Tensor)) or not isinstance(item, Iterable):
            raise TypeError(
                f"weight stream item {position} is a {type(item).__name__}; expected an "
                "(hf_name, tensor) pair or a bucket (list of pairs, or dict name -> tensor)"
            )
        bucket = _as_pairs(item, position)
        if bucket:
            yield bucket
    if pending:
        yield pending


def bucket_nbytes(bucket: list[NamedTensor]) -> int:
    """Payload size of a bucket in bytes."""
    return sum(t.numel() * t.element_size() for _, t in bucket)


def iter_safetensors_dir(path) -> Iterator[list[NamedTensor]]:
    """An HF checkpoint directory -> one bucket per ``*.safetensors`` file, lazily."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; save the weights with safe_serialization")
    for file in files:
        yield list(load_file(str(file)).items())


def save_stream_to_dir(stream, path, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """Write a weight stream as safetensors shards (one per bucket) into ``path``; returns tensors written.

    Shards are written under temporary names and renamed, so a reader never sees half a file.
    """
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    written = 0
    for index, bucket in enumerate(iter_buckets(stream, bucket_bytes)):
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
        final = path / f"weights-{index:05d}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, final)
        written += len(tensors)
    return written
