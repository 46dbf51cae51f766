"""The process group that carries weights from the trainer to disaggregated servers.

SGLang's ``/init_weights_update_group`` makes every server rank join a fresh group
(trainer = rank 0, server ranks from ``rank_offset``) through a TCP rendezvous at
``master_address:master_port``; ``/update_weights_from_distributed`` then receives each
tensor by ``broadcast(src=0)`` in the order of its ``names``. Both sides must build the
group the same way, store keys included, or the rendezvous never completes. SGLang
does it with torch's private ``_new_process_group_helper`` on a ``PrefixStore(group_name)``
(``sglang.srt.utils.init_custom_process_group``); :func:`join_weight_group` does the same,
so the trainer can talk to real SGLang servers (NCCL) and the stand-in (gloo) alike.

A group built here is not the default process group: Megatron's own groups are
untouched, and the group needs no ``init_process_group`` in the server.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


def join_weight_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "nccl",
    timeout_s: float = 300.0,
):
    """Join (rank 0: host) the weight-update group; blocks until all ranks arrived."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    # Ranks of this group are its own global ranks (what broadcast(src=0) resolves against).
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_tensors(group, tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0 sends / other ranks receive ``tensors`` in order (each in place)."""
    for tensor in tensors:
        dist.broadcast(tensor, group=group, group_src=0)


def leave_weight_group(group) -> None:
    dist.destroy_process_group(group)
