"""Run a function on N local `gloo` ranks: the harness for every multi-rank test and benchmark.

``run_ranks(fn, 2, *args)`` spawns two fresh processes, gives each a process group over
``gloo`` on a free loopback port, calls ``fn(rank, world_size, *args)`` and returns the list of
per-rank return values (they must pickle). An exception on any rank is re-raised here as
:class:`RankFailure` naming the rank and carrying its traceback; a rank that hangs past
``timeout`` seconds kills the whole job and raises ``TimeoutError``.

Spawning costs ~5 s (imports dominate), so group checks that share a layout into one ``fn``.
``fn`` must be importable by name from a module (not a lambda, not a nested function).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailure(RuntimeError):
    """An exception raised on one rank of a multi-rank job."""

    def __init__(self, rank: int, tb: str):
        super().__init__(f"rank {rank} failed:\n{tb}")
        self.rank = rank
        self.remote_traceback = tb


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results, env):
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.simplefilter("ignore")  # megatron warns per rank about absent TE/Apex
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            _teardown()
        # Tensors in a torch.multiprocessing queue travel as shared-memory handles that die
        # with this process; send plain bytes instead.
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its rank
        results.put((rank, False, traceback.format_exc()))


def _teardown():
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - megatron may be absent or never initialised
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Not daemonic: ranks may start their own workers (reward pools); they are joined or
    # killed in the finally block below.
    procs = [ctx.Process(target=_worker, daemon=False,
                         args=(r, world_size, port, fn, args, results, dict(env or {})))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(outs) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outs))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in outs and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailure(dead[0], f"process exited with code "
                                               f"{procs[dead[0]].exitcode} before reporting")
                continue
            if not ok:
                raise RankFailure(rank, value)
            import torch

            outs[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outs[r] for r in range(world_size)]
