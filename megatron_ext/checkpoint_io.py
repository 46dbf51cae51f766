"""Moving state to and from megatron-core ``dist_checkpointing`` (``torch_dist``), with the
workarounds megatron-core 0.16.1 needs. Used by :mod:`megatron_ext.checkpoint`.

- :func:`save_strategy`: the ``torch_dist`` save strategy with an in-process writer.
  megatron-core's own writer forks one process per file and collects their results through a
  multiprocessing Manager, which a daemonic process (every rank of
  :mod:`megatron_ext.multirank`) may not start. Same files, same format.
- :func:`build_factories_in_place` / :func:`finish_factories`: load the fused SwiGLU
  ``linear_fc1`` (stored as gate and up halves) straight into the parameter instead of into a
  concatenated copy.
- :func:`zero_adam_state` and :func:`load_optimizer_state`: torch AdamW has no state before
  its first step, which megatron-core can neither save (the distributed optimizer asserts)
  nor load into; and the ``fully_reshardable`` load raises ``KeyError: 'step'``.
"""

from __future__ import annotations

import os
import queue

import torch


def save_strategy(fsync: bool):
    """megatron-core's ``torch_dist`` save strategy with an in-process writer (see module)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import (
        save_state_dict_async_plan)
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, TorchDistSaveShardedStrategy, _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
    from torch.distributed.checkpoint.planner import WriteItemType

    class InProcessWriter(FileSystemWriterAsync):
        """One file per rank, written by the calling process."""

        def prepare_write_data(self, plan, planner):
            def cpu(t):
                t = t.detach().to("cpu")
                # torch.save of a view writes its whole storage (e.g. DDP's flat buffer).
                return t.clone() if t.untyped_storage().size() != t.numel() * t.itemsize else t

            items = plan.items
            data = ([(i, planner.resolve_data(i)) for i in items if i.type == WriteItemType.BYTE_IO],
                    [(i, cpu(planner.resolve_data(i))) for i in items
                     if i.type != WriteItemType.BYTE_IO])
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            self.write_buckets = [(os.path.join(self.checkpoint_dir, name), name, data)] if items else []
            self.results_queue = None
            self._results = {}

        def get_save_function_and_args(self):
            return (self._write, None, []) if self.write_buckets else (None, None, [])

        def _write(self):
            from torch.utils.serialization import config as serialization

            transforms = [self.transforms] if hasattr(self, "transforms") else []
            results, count = queue.Queue(), queue.Queue()
            # Each tensor is a torch.save record; torch.load never checks the zip CRC-32, so
            # computing it costs ~30% of the write for nothing.
            crc, serialization.save.compute_crc32 = serialization.save.compute_crc32, False
            try:
                for i, bucket in enumerate(self.write_buckets):
                    count.put(i)
                    FileSystemWriterAsync.write_preloaded_data(transforms, i, bucket, results,
                                                               count, use_fsync=fsync)
                    idx, out = results.get()
                    if isinstance(out, Exception):
                        raise RuntimeError(f"writing {bucket[0]} failed: {out}") from out
                    self._results[idx] = out
            finally:
                serialization.save.compute_crc32 = crc

        def retrieve_write_results(self):
            return [r for i in sorted(self._results) for r in self._results[i]]

    class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            writer = InProcessWriter(checkpoint_dir, thread_count=1)
            ret = save_state_dict_async_plan(
                mcore_to_pyt_state_dict(sharded_state_dict, False), writer, None, 0,
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                         flatten_state_dict=False))[0]
            return self._get_save_and_finalize_callbacks(writer, ret)

    return InProcessTorchDistSave("torch_dist", 1)


def build_factories_in_place(state: dict) -> list:
    """Build the model's ``ShardedTensorFactory`` entries (the fused SwiGLU ``linear_fc1`` is
    stored as its gate and up halves) before loading, so their pieces, views of the parameter,
    are filled in place; :func:`finish_factories` then hands back the parameter itself.
    ``dist_checkpointing.load`` would instead concatenate the pieces into new tensors, holding
    a second copy of every fc1 (~45% of a dense model) until ``load_state_dict``.

    Only the top-level ``model*`` entries are touched (an optimizer's sharded state refers to
    the factories, so it must be built from the untouched dict first)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    merges = []
    for model_key, sd in state.items():
        if not model_key.startswith("model"):
            continue
        for name, value in list(sd.items()):
            if not isinstance(value, ShardedTensorFactory):
                continue
            built = value.build()
            pieces = built if isinstance(built, list) else [built]
            base = value.data.untyped_storage().data_ptr()
            in_place = all(getattr(p, "data", None) is not None
                           and p.data.untyped_storage().data_ptr() == base for p in pieces)
            sd[name] = built
            merges.append((model_key, name, value, in_place))
    return merges


def finish_factories(loaded: dict, merges: list) -> None:
    for model_key, name, factory, in_place in merges:
        loaded[model_key][name] = (factory.data if in_place
                                   else factory.merge_fn(loaded[model_key][name]))


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` with megatron-core 0.16.1's fully-reshardable bug avoided:
    its parameter-state copy expects every key of the torch AdamW state, ``step`` included,
    in the checkpoint, which stores ``step`` in the param groups instead (``KeyError:
    'step'``). So: load groups and steps first, then the parameter state with ``step`` set
    aside, then put each parameter's ``step`` back."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from .cpu_compat import _inner_torch_optimizers

    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        if len(chained) == 1:
            load_optimizer_state(chained[0], state)
            return
        if len(chained) != len(state):
            raise ValueError(f"checkpoint holds {len(state)} optimizer states, the optimizer "
                             f"has {len(chained)}")
        for opt, key in zip(chained, sorted(state)):
            load_optimizer_state(opt, state[key])
        optimizer._synchronize_steps()
        return
    if not (isinstance(optimizer, DistributedOptimizer)
            and state.get("param_state_sharding_type") == "fully_reshardable"):
        optimizer.load_state_dict(state)
        return
    state = dict(state)
    param_state = state.pop("param_state")
    optimizer.load_state_dict(state)
    inner = _inner_torch_optimizers(optimizer)
    steps = [{p: st.pop("step") for p, st in opt.state.items() if "step" in st} for opt in inner]
    optimizer.load_parameter_state_from_fully_reshardable(param_state)
    for opt, saved in zip(inner, steps):
        for p, step in saved.items():
            opt.state[p]["step"] = step


def zero_adam_state(optimizer) -> None:
    """Give every parameter of the inner torch optimizer(s) that has no state zero Adam state
    and its own ``step`` of 0 — what AdamW's first step would create, so stepping after it is
    unchanged. Torch AdamW has no state before its first step, and megatron-core can neither
    save that (the distributed optimizer asserts) nor load into it."""
    from .cpu_compat import _inner_torch_optimizers

    for opt in _inner_torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
