"""HF-named weights out of, and into, a live distributed Megatron model.

:func:`export_hf_weights` streams buckets of ``(hf_name, full tensor)`` — the rollout weight
sync and the Megatron -> HF converter both consume it; :func:`load_hf_weights` is the inverse
(HF -> this rank's shards). Names and layouts come from :mod:`megatron_ext.hf.mapping`, the one
table per family; this module adds the parallel placement:

- **TP**: a partitioned parameter is all-gathered over its stage's tensor-parallel group and
  concatenated on the dimension Megatron splits (the row's ``tp_dim``: the parameters' own
  TP attributes are not relied on, Megatron only sets them when it initialises weights). The
  GLU ``linear_fc1`` is the exception: each shard is ``[gate_r; up_r]``, regrouped to
  ``[gate; up]``. QKV shards are whole query groups of the grouped layout, so a plain
  concatenation restores it. Loading slices the same way.
- **PP**: each stage exports the layers it owns under their GLOBAL index; the first stage
  exports the embedding, the last stage the final norm and (untied) ``lm_head``. With tied
  embeddings the last stage's ``output_layer`` copy is never exported (HF stores one tensor).
- **DP/CP**: replicas hold identical weights; nothing crosses replicas.

Who receives what (``gather_pipeline=False``, the default): EVERY rank calls
``export_hf_weights`` and iterates it to the end (it is a collective: TP all-gathers inside
each stage, plus one DP-wide parameter sync when the distributed optimizer defers its
all-gather). Every rank then receives its own PP stage's tensors, full (TP-gathered); the
buckets of the ranks for which :func:`is_export_rank` is True — TP rank 0, CP rank 0, DP rank 0,
one per PP stage (:func:`export_ranks`) — together hold every HF tensor exactly once. With
``gather_pipeline=True`` every stage's buckets are also broadcast over the PP group, so every
rank receives the whole model, one bucket at a time, and the single export rank is the one
with TP = CP = DP = PP rank 0. No rank ever holds more than one bucket plus one gathered
parameter of exported data.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from .hf.mapping import GATE_UP, HFMapping, Row, WeightMismatchError

NamedTensor = tuple[str, torch.Tensor]


def export_hf_weights(model, *, bucket_bytes: int, hf_config,
                      gather_pipeline: bool = False) -> Iterator[list[NamedTensor]]:
    """Buckets of ``(hf_name, tensor)`` over this rank's PP stage (or all stages).

    Args:
        model: this rank's model chunks (DDP-wrapped or bare ``GPTModel``), or one chunk.
        bucket_bytes: a bucket holds at most this many bytes of tensor data; a single tensor
            larger than that travels alone in its own bucket.
        hf_config: the HF config the model was built from (vocabulary size, family, heads).
        gather_pipeline: also broadcast every stage's buckets over the PP group (see module).

    Yields:
        lists of ``(hf_name, tensor)``; tensors are full HF shapes (vocabulary unpadded), in the
        parameters' dtype and device, and may share storage with the live parameters at TP=1:
        copy them if you keep them past the next optimizer step.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    from megatron.core import parallel_state as ps

    chunks = model_chunks(model)
    mapping = HFMapping(hf_config)
    _finish_param_sync(model if isinstance(model, (list, tuple)) else [model])
    local = _bucketed(_stage_tensors(chunks, mapping), bucket_bytes)
    if not gather_pipeline or ps.get_pipeline_model_parallel_world_size() == 1:
        yield from local
        return
    yield from _broadcast_stages(local, ps.get_pipeline_model_parallel_group(), chunks)


def is_export_rank(gather_pipeline: bool = False) -> bool:
    """True where the buckets of :func:`export_hf_weights` are the ones to consume: TP, CP and
    DP rank 0 of each PP stage (and PP rank 0 too with ``gather_pipeline``)."""
    from megatron.core import parallel_state as ps

    first = (ps.get_tensor_model_parallel_rank() == 0
             and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    return first and (not gather_pipeline or ps.get_pipeline_model_parallel_rank() == 0)


def export_ranks(gather_pipeline: bool = False) -> list[int]:
    """Global ranks for which :func:`is_export_rank` holds, in PP-stage order. Collective over
    the default group (every rank must call it)."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (_pp_rank(), is_export_rank(gather_pipeline)))
    return [r for _, r in sorted((pp, r) for r, (pp, ok) in enumerate(flags) if ok)]


def load_hf_weights(model, weights, *, hf_config, optimizer=None,
                    source: str = "weights") -> None:
    """Slice full HF tensors into this rank's shards, strictly.

    Args:
        model: this rank's model chunks (DDP-wrapped or bare), or one chunk.
        weights: every tensor of the HF checkpoint, as a ``Mapping`` name -> tensor (may be
            lazy, e.g. :class:`megatron_ext.hf.files.SafetensorsCheckpoint`; only this rank's
            tensors are read) or an iterable of ``(name, tensor)`` pairs or buckets of them
            (consumed once; tensors other ranks own are dropped on arrival).
        hf_config: the HF config the model was built from.
        optimizer: when given, its fp32 main parameters are refreshed from the loaded weights
            (``reload_model_params``), as a mixed-precision optimizer keeps its own copy.
        source: how errors name the origin of ``weights`` (e.g. the checkpoint directory).

    Raises :class:`megatron_ext.hf.mapping.WeightMismatchError` naming the tensor for a
    missing, extra, duplicated or mis-shaped tensor. With a Mapping every check runs before
    any parameter changes; with a stream, the model may be partly loaded when it raises.
    """
    chunks = model_chunks(model)
    mapping = HFMapping(hf_config)
    targets = list(_stage_params(chunks, mapping))
    if isinstance(weights, Mapping):
        shapes = getattr(weights, "shapes", None) or {k: tuple(v.shape) for k, v in weights.items()}
        mapping.check_hf_tensors(shapes, source)
        with torch.no_grad():
            for _, row, layer, p in targets:
                names = mapping.hf_names(row, layer)
                _assign(mapping, p, row, layer, [weights[n] for n in names], source)
    else:
        _load_stream(targets, mapping, weights, source)
    if optimizer is not None:
        optimizer.reload_model_params()


# -- model walking ----------------------------------------------------------------------


def model_chunks(model) -> list[torch.nn.Module]:
    """This rank's ``GPTModel`` chunks from a list of (DDP / Float16Module-wrapped) chunks or
    one chunk."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for c in chunks:
        # DDP and Float16Module keep the GPTModel in .module.
        while not hasattr(c, "decoder") and hasattr(c, "module"):
            c = c.module
        out.append(c)
    return out


def _global_name(module, name: str) -> str:
    """``decoder.layers.<local>.x`` -> ``decoder.layers.<global>.x`` (PP/VPP stages number
    their layers from 0; ``layer_number`` is global and 1-based)."""
    parts = name.split(".", 3)
    if len(parts) > 3 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(module.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _stage_params(chunks, mapping: HFMapping):
    """(global name, row, layer, param) of every parameter of this rank's chunks."""
    for module in chunks:
        for name, p in module.named_parameters():
            gname = _global_name(module, name)
            row, layer = mapping.resolve(gname)
            yield gname, row, layer, p


def _tp():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _pp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank()


def _finish_param_sync(chunks_or_ddp) -> None:
    """The distributed optimizer with ``overlap_param_gather`` defers the all-gather of updated
    parameters to the next forward; force it now so the export sees the stepped weights."""
    for c in chunks_or_ddp:
        cfg = getattr(c, "ddp_config", None)
        if cfg is not None and cfg.use_distributed_optimizer and cfg.overlap_param_gather:
            c.start_param_sync(force_sync=True)


# -- export ------------------------------------------------------------------------------


def _gather_full(p: torch.Tensor, row: Row, tp: int, group) -> torch.Tensor:
    """This rank's shard -> the full Megatron tensor (see module docstring for fc1)."""
    t = p.detach()
    if tp == 1 or row.tp_dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    if row.layout == GATE_UP:
        halves = [x.chunk(2, dim=0) for x in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=row.tp_dim)


def _stage_tensors(chunks, mapping: HFMapping) -> Iterator[NamedTensor]:
    tp, _, group = _tp()
    for gname, row, layer, p in _stage_params(chunks, mapping):
        if not row.exported:
            continue
        yield from mapping.to_hf(row, layer, _gather_full(p, row, tp, group))


def _bucketed(pairs: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    bucket, size = [], 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _broadcast_stages(local: Iterator[list[NamedTensor]], pp_group, chunks):
    """Every stage in turn broadcasts its buckets over the PP group: a (name, shape, dtype)
    list as an object, then the tensors packed into one byte buffer; ``None`` ends a stage."""
    device = next(chunks[0].parameters()).device
    me = dist.get_rank(pp_group)
    for stage in range(dist.get_world_size(pp_group)):
        src = dist.get_global_rank(pp_group, stage)
        while True:
            bucket = next(local, None) if stage == me else None
            meta = [None if bucket is None else [(n, tuple(t.shape), t.dtype) for n, t in bucket]]
            dist.broadcast_object_list(meta, src=src, group=pp_group, device=device)
            if meta[0] is None:
                break
            offsets, total = _packing(meta[0])
            flat = torch.empty(total, dtype=torch.uint8, device=device)
            if stage == me:
                for (_, t), at in zip(bucket, offsets):
                    flat[at:at + t.numel() * t.element_size()].copy_(
                        t.contiguous().reshape(-1).view(torch.uint8))
            dist.broadcast(flat, src=src, group=pp_group)
            if stage == me:
                yield bucket
                continue
            yield [(name, flat[at:at + _numel(shape) * dtype.itemsize].view(dtype).reshape(shape))
                   for (name, shape, dtype), at in zip(meta[0], offsets)]


def _packing(meta) -> tuple[list[int], int]:
    """Byte offsets of a bucket's tensors in one buffer, each 16-byte aligned so that every
    slice can be viewed as its dtype; and the buffer size."""
    offsets, at = [], 0
    for _, shape, dtype in meta:
        offsets.append(at)
        at += -(-(_numel(shape) * dtype.itemsize) // 16) * 16
    return offsets, at


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- load --------------------------------------------------------------------------------


def _assign(mapping: HFMapping, p: torch.Tensor, row: Row, layer: int | None,
            tensors: list[torch.Tensor], source: str) -> None:
    """Write this rank's TP shard of ``row``, built from its HF tensors, into ``p``."""
    tp, r, _ = _tp()
    mapping.from_hf_into(row, layer, tensors, p.data, tp=tp, rank=r, source=source)


def _pairs(stream) -> Iterator[NamedTensor]:
    for item in stream:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        elif isinstance(item, Mapping):
            yield from item.items()
        else:
            yield from item


def _load_stream(targets, mapping: HFMapping, stream, source: str) -> None:
    expected = mapping.hf_shapes()
    waiting = {}  # hf name -> indices of targets that need it
    for i, (_, row, layer, _) in enumerate(targets):
        for n in mapping.hf_names(row, layer):
            waiting.setdefault(n, []).append(i)
    held: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    done = [False] * len(targets)
    with torch.no_grad():
        for name, t in _pairs(stream):
            if name in seen:
                raise WeightMismatchError(f"{source}: tensor {name} appears twice")
            seen.add(name)
            if name not in expected:
                if mapping.is_ignored(name):
                    if name == "lm_head.weight":  # tied: must at least match the embedding
                        mapping.check_shape(name, tuple(t.shape), source,
                                            expected["model.embed_tokens.weight"])
                    continue
                raise WeightMismatchError(f"{source}: unexpected tensor {name} for a "
                                          f"{mapping.model_type} model with num_hidden_layers="
                                          f"{mapping.num_layers}")
            mapping.check_shape(name, tuple(t.shape), source)
            if name not in waiting:
                continue  # owned by another pipeline stage
            held[name] = t
            for i in waiting[name]:
                _, row, layer, p = targets[i]
                names = mapping.hf_names(row, layer)
                if not done[i] and all(n in held for n in names):
                    _assign(mapping, p, row, layer, [held[n] for n in names], source)
                    done[i] = True
            if all(done[i] for i in waiting[name]):
                for n in _names_of(targets, waiting[name], mapping):
                    if all(done[j] for j in waiting[n]):
                        held.pop(n, None)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:6]) + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
        raise WeightMismatchError(f"{source}: missing {len(missing)} tensor(s) the "
                                  f"{mapping.model_type} config needs: {shown}")
    assert all(done), [targets[i][0] for i, d in enumerate(done) if not d]


def _names_of(targets, indices, mapping: HFMapping) -> set[str]:
    return {n for i in indices for n in mapping.hf_names(targets[i][1], targets[i][2])}


def write_hf_checkpoint(model, out_dir: str, *, hf_config, config_path: str | None = None,
                        files_dir: str | None = None, shard_bytes: int = 2 << 30,
                        force: bool = False) -> None:
    """Write the live model as a Hugging Face checkpoint directory, all-or-nothing. Collective.

    Sharded safetensors (+ index) from :func:`export_hf_weights` on the single export rank;
    ``config_path`` (default ``<files_dir>/config.json``) is copied as ``config.json`` with the
    stored dtype recorded; ``files_dir``'s tokenizer and generation-config files come along.
    """
    from .checkpoint import staged_directory
    from .hf.files import ShardedSafetensorsWriter, copy_metadata_files, set_config_dtype

    config_path = config_path or (os.path.join(files_dir, "config.json") if files_dir else None)
    if config_path is None:
        raise ValueError("write_hf_checkpoint needs config_path or files_dir (for config.json)")
    writes = is_export_rank(gather_pipeline=True)
    with staged_directory(out_dir, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp) if writes else None
        for bucket in export_hf_weights(model, bucket_bytes=shard_bytes, hf_config=hf_config,
                                        gather_pipeline=True):
            if writes:
                writer.write_shard(bucket)
        if writes:
            writer.close()
            if files_dir:
                copy_metadata_files(files_dir, tmp)
            shutil.copyfile(config_path, os.path.join(tmp, "config.json"))
            param = next(model_chunks(model)[0].parameters())
            set_config_dtype(os.path.join(tmp, "config.json"), param.dtype)
