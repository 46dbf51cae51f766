"""Megatron checkpoints: the model alone (conversion), and the trainer's resume checkpoint.

Both are megatron-core ``dist_checkpointing`` directories in the ``torch_dist`` format: every
tensor is stored once under its global key with its global shape, so a checkpoint written at
one TP/PP/DP layout loads at another (the padded vocabulary rows may differ between layouts:
Megatron marks them ``allow_shape_mismatch`` and reads the overlap). Model keys are the inner
module's ``sharded_state_dict`` (never DDP's ``module.`` prefix), under ``"model"`` for one
chunk or ``"model<i>"`` per virtual-pipeline chunk (Megatron-LM's convention).

Model checkpoint (:func:`save_model_checkpoint` / :func:`load_model_checkpoint`)::

    <dir>/  metadata.json, .metadata, common.pt, __<rank>_<n>.distcp   (dist_checkpointing)
            groupwise.json   {"kind": "model", "model_type", "vocab_size", "params_dtype", layout}
            hf/              config.json, generation_config.json, tokenizer files (when given)

Resume checkpoint (:func:`save_checkpoint` / :func:`latest_checkpoint` /
:func:`load_checkpoint`)::

    <root>/ latest                      "step_<N>", replaced atomically after each save
            step_<N>/  dist_checkpointing files of {"model...": ..., "optimizer": ...}
                       groupwise.json   kind "resume", step, layout
                       scheduler.json   extra.json   rng/pp<p>-tp<t>-cp<c>-dp<d>.pt
                       hf/              as above, when given (then it converts to HF alone)

A save writes ``<root>/tmp-step-<N>-<random>``, fsyncs it, renames it to ``step_<N>`` and only
then rewrites ``latest`` (write + fsync + rename); so an interrupted save leaves the previous
checkpoint and pointer untouched, and its stale ``tmp-*`` directory is ignored by
:func:`latest_checkpoint` and removed by the next save. The last ``keep_last`` steps are kept.

How the state moves to and from ``dist_checkpointing`` (an in-process writer, fc1 loaded in
place, the optimizer workarounds) is :mod:`megatron_ext.checkpoint_io`.

Distributed-optimizer workarounds for megatron-core 0.16.1 (see the CPU facts spec): state is
saved with ``distrib_optim_sharding_type="fully_reshardable"`` (DP/TP/PP reshardable; the
default type fails to save), the optimizer gets zero Adam state before loading (torch AdamW
has none before its first step), and every parameter gets its own ``step`` tensor after
loading (:func:`megatron_ext.cpu_compat.fix_shared_adam_step`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .checkpoint_io import (build_factories_in_place, finish_factories, load_optimizer_state,
                            save_strategy, zero_adam_state)
from .export import model_chunks
from .hf.files import copy_metadata_files

log = logging.getLogger(__name__)

META_NAME = "groupwise.json"
HF_SUBDIR = "hf"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"step_(\d+)")
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


# -- model state -------------------------------------------------------------------------


def model_sharded_state_dict(model) -> dict:
    """``{"model": sd}`` (one chunk) or ``{"model0": sd0, "model1": sd1, ...}`` of the inner
    modules' sharded state dicts."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_model_state(model, loaded: dict) -> None:
    chunks = model_chunks(model)
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(loaded[key], strict=True)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "context_parallel": ps.get_context_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def _coords() -> dict:
    from megatron.core import parallel_state as ps

    return {"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
            "cp": ps.get_context_parallel_rank(), "dp": ps.get_data_parallel_rank()}


def _model_meta(model, hf_config) -> dict:
    p = next(model_chunks(model)[0].parameters())
    meta = {"params_dtype": str(p.dtype).removeprefix("torch."), "layout": _layout()}
    if hf_config is not None:
        from .model import load_hf_config

        hf = load_hf_config(hf_config)
        meta.update(model_type=hf.model_type, vocab_size=hf.vocab_size)
    return meta


def save_model_checkpoint(path: str, model, *, hf_config=None, hf_files_dir: str | None = None,
                          fsync: bool = False) -> None:
    """Save the model (weights only) as a reshardable dist checkpoint. Collective: every rank.

    ``path`` must not exist or be empty. ``hf_config`` (a transformers config, dict or path)
    is recorded in ``groupwise.json``; ``hf_files_dir``, a HF model dir, has its config,
    generation config and tokenizer files copied into ``<path>/hf`` (rank 0), so the reverse
    conversion needs nothing else. ``fsync``: flush every file to disk before returning (the
    converters skip it: their output appears by an atomic rename, and a machine crash before
    the kernel wrote it back means a rerun, not a silently wrong checkpoint in use).
    """
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        if os.listdir(path):
            raise FileExistsError(f"{path} is not empty; refusing to write a checkpoint into it")
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), path,
                            sharded_strategy=save_strategy(fsync=fsync))
    if dist.get_rank() == 0:
        _write_json(os.path.join(path, META_NAME), dict(_model_meta(model, hf_config), kind="model"))
        if hf_files_dir is not None:
            copy_metadata_files(hf_files_dir, os.path.join(path, HF_SUBDIR))
    dist.barrier()


def load_model_checkpoint(path: str, model) -> dict:
    """Load weights saved by :func:`save_model_checkpoint` (or the model part of a resume
    checkpoint) into this rank's shards, at any TP/PP. Collective. Returns groupwise.json."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    meta = read_meta(path)
    state = model_sharded_state_dict(model)
    merges = build_factories_in_place(state)
    loaded = dist_checkpointing.load(state, path, strict=StrictHandling.RAISE_UNEXPECTED
                                     if meta.get("kind") == "model" else
                                     StrictHandling.ASSUME_OK_UNEXPECTED)
    finish_factories(loaded, merges)
    _load_model_state(model, loaded)
    return meta


def read_meta(path: str) -> dict:
    meta_file = os.path.join(path, META_NAME)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path} is not a Megatron dist checkpoint (no metadata.json)")
    if not os.path.isfile(meta_file):
        return {}
    with open(meta_file) as f:
        return json.load(f)


# -- resume checkpoint -------------------------------------------------------------------


def save_checkpoint(root: str, step: int, model, optimizer=None, scheduler=None,
                    extra: dict | None = None, keep_last: int = 2, *, hf_config=None,
                    hf_files_dir: str | None = None) -> str:
    """Write ``<root>/step_<step>`` atomically and point ``<root>/latest`` at it.

    Collective over all ranks. Saves the model, the optimizer (distributed or not; None: not
    saved), the scheduler's state, every rank's RNG states and ``extra`` (JSON: data position,
    metrics state...). ``hf_config`` / ``hf_files_dir`` as in :func:`save_model_checkpoint`:
    with them, ``tools.convert_megatron_to_hf --ckpt <root>/step_<N>`` needs no other input.
    Keeps the newest ``keep_last`` step directories. Returns the step directory.
    """
    from megatron.core import dist_checkpointing

    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last}: keep at least one checkpoint")
    extra_json = json.dumps(extra or {})  # raises here, before anything is written
    sched_json = json.dumps(scheduler.state_dict() if scheduler is not None else None)
    rank = dist.get_rank()
    name = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        name[0] = f"tmp-step-{step}-{secrets.token_hex(4)}"
        os.makedirs(os.path.join(root, name[0]))
    dist.broadcast_object_list(name, src=0)
    tmp = os.path.join(root, name[0])
    final = os.path.join(root, f"step_{step}")
    try:
        model_sd = model_sharded_state_dict(model)
        state = dict(model_sd)
        if optimizer is not None:
            zero_adam_state(optimizer)  # before the first step there is no state to save
            state["optimizer"] = optimizer.sharded_state_dict(model_sd,
                                                              metadata=dict(_OPT_METADATA))
        dist_checkpointing.save(state, tmp, sharded_strategy=save_strategy(fsync=True))
        coords = _coords()
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", _rng_name(coords)))
        if rank == 0:
            _write_text(os.path.join(tmp, "extra.json"), extra_json)
            _write_text(os.path.join(tmp, "scheduler.json"), sched_json)
            _write_json(os.path.join(tmp, META_NAME),
                        dict(_model_meta(model, hf_config), kind="resume", step=step,
                             optimizer=optimizer is not None))
            if hf_files_dir is not None:
                copy_metadata_files(hf_files_dir, os.path.join(tmp, HF_SUBDIR))
        dist.barrier()
        if rank == 0:
            _fsync_tree(tmp)
            _publish(tmp, final)
            _write_text(os.path.join(root, LATEST_NAME), f"step_{step}\n", atomic=True)
            _prune(root, step, keep_last)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def latest_checkpoint(root: str) -> str | None:
    """The step directory ``<root>/latest`` names, or when that pointer is missing or names
    an incomplete directory, the highest complete ``step_<N>``; None when there is none.
    ``tmp-*`` directories (interrupted saves) are never returned."""
    if not os.path.isdir(root):
        return None
    pointer = os.path.join(root, LATEST_NAME)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if _STEP_DIR.fullmatch(named) and _is_complete(os.path.join(root, named)):
            return os.path.join(root, named)
    steps = [(int(m.group(1)), n) for n in os.listdir(root)
             if (m := _STEP_DIR.fullmatch(n)) and _is_complete(os.path.join(root, n))]
    return os.path.join(root, max(steps)[1]) if steps else None


def load_checkpoint(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Restore a :func:`save_checkpoint` directory at any DP (and TP/PP) size; returns ``extra``.

    Collective. RNG states are restored only when the layout equals the saved one (each rank
    then gets its own); otherwise they are left as they are, with a warning, since per-rank
    streams have no meaning across layouts.
    """
    from megatron.core import dist_checkpointing

    from .cpu_compat import fix_shared_adam_step

    meta = read_meta(path)
    if meta.get("kind") != "resume":
        raise ValueError(f"{path} is not a resume checkpoint (groupwise.json kind="
                         f"{meta.get('kind')!r}); load model-only checkpoints with "
                         "load_model_checkpoint")
    model_sd = model_sharded_state_dict(model)
    state = dict(model_sd)
    if optimizer is not None:
        if not meta.get("optimizer", True):
            raise ValueError(f"{path} was saved without an optimizer state")
        zero_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                          metadata=dict(_OPT_METADATA))
    merges = build_factories_in_place(state)  # after the optimizer's dict, which refers to them
    loaded = dist_checkpointing.load(state, path)
    finish_factories(loaded, merges)
    _load_model_state(model, loaded)
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
        fix_shared_adam_step(optimizer)
    if scheduler is not None:
        with open(os.path.join(path, "scheduler.json")) as f:
            sched = json.load(f)
        if sched is None:
            raise ValueError(f"{path} was saved without a scheduler state")
        scheduler.load_state_dict(sched)
    if meta.get("layout") == _layout():
        rng_file = os.path.join(path, "rng", _rng_name(_coords()))
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif dist.get_rank() == 0:
        log.warning("%s: saved at layout %s, loading at %s: RNG states not restored",
                    path, meta.get("layout"), _layout())
    with open(os.path.join(path, "extra.json")) as f:
        return json.load(f)


# -- RNG ---------------------------------------------------------------------------------


def _rng_name(c: dict) -> str:
    return f"pp{c['pp']}-tp{c['tp']}-cp{c['cp']}-dp{c['dp']}.pt"


def _rng_state() -> dict:
    import numpy as np
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# -- files -------------------------------------------------------------------------------


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META_NAME)) and os.path.isfile(
        os.path.join(path, "metadata.json"))


def _write_json(path: str, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_text(path: str, text: str, atomic: bool = False) -> None:
    target = path
    if atomic:
        path = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(path, target)
        _fsync_dir(os.path.dirname(target) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _publish(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is moved
    aside first and deleted only once the new one is in place."""
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, f"tmp-replaced-{os.path.basename(final)}-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(out: str, *, force: bool = False) -> Iterator[str]:
    """Write a directory all-or-nothing: yields a fresh sibling ``<out>.tmp-<random>`` to fill;
    on success it is renamed to ``out`` (an existing ``out`` is refused unless ``force``, and
    then replaced only once the new one is complete); on an exception it is removed.

    Collective when a process group exists: rank 0 does the file-system work, every rank gets
    the same temporary path and must leave the block together.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_abs = os.path.abspath(out)
    if os.path.exists(out_abs) and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    name = [None]
    if rank == 0:
        parent = os.path.dirname(out_abs)
        os.makedirs(parent, exist_ok=True)
        name[0] = f"{out_abs}.tmp-{secrets.token_hex(4)}"
        os.makedirs(name[0])
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    tmp = name[0]
    try:
        yield tmp
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            _publish(tmp, out_abs)
        if dist.is_initialized():
            dist.barrier()  # nobody reads `out` before it exists
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(root: str, step: int, keep_last: int) -> None:
    """Keep ``step_<step>`` and the ``keep_last - 1`` newest older steps; remove stale ``tmp-*``
    directories. Steps newer than ``step`` (an abandoned later run) are left alone."""
    older = sorted(int(m.group(1)) for n in os.listdir(root)
                   if (m := _STEP_DIR.fullmatch(n)) and int(m.group(1)) < step)
    for s in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(os.path.join(root, f"step_{s}"), ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith("tmp-") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
