"""Request batching for the stand-in server: queue rows, run them in batches, pause, abort.

SGLang schedules continuously (new requests join a running batch at the next step); the
stand-in batches in rounds: everything queued when a round starts runs together, and
requests arriving meanwhile wait for the next round. Results are the same either way
(each row samples from its own seed), only latency differs.

All engine work runs on one worker thread, so the aiohttp loop keeps answering
``/health`` while a batch computes, and weight updates, memory release and batches
never overlap: they queue on ``model_lock`` in arrival order (``asyncio.Lock`` is FIFO).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from inference.embedded import EmbeddedEngine, RowRequest
from inference.engine import FINISH_ABORT, Completion

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass
class _Pending:
    row: RowRequest
    rid: str
    future: asyncio.Future = field(repr=False)


class BatchScheduler:
    """Owns the engine's thread; every engine call goes through :meth:`run_exclusive` or a batch."""

    def __init__(self, engine: EmbeddedEngine, max_batch_size: int):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.model_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._paused = False
        self._abort_running = threading.Event()
        self._running: list[_Pending] = []
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-loop")

    async def stop(self) -> None:
        self._abort_running.set()
        self.abort_pending()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Something is running or about to run. Requests held by a pause do not count: SGLang
        holds them in its tokenizer manager, outside the scheduler whose cache a flush clears."""
        return bool(self._running or (self._pending and not self._paused))

    # ------------------------------------------------------------------ requests

    async def submit(self, rows: list[tuple[RowRequest, str]]) -> list[Completion]:
        """Queue rows (with their request ids) and wait for their completions."""
        loop = asyncio.get_running_loop()
        items = [_Pending(row, rid, loop.create_future()) for row, rid in rows]
        self._pending.extend(items)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            # A client that hung up leaves nothing queued behind it.
            self._pending = [p for p in self._pending if p not in items]

    async def run_exclusive(self, fn: Callable[..., Any], *args) -> Any:
        """Run ``fn(*args)`` on the engine thread once the current batch is done."""
        async with self.model_lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ pause / abort

    def pause(self, mode: str) -> None:
        """SGLang's /pause_generation. ``abort`` ends running and queued requests with
        finish reason ``abort``; ``retract``/``in_place`` let the running round finish
        and hold the queue (the stand-in keeps no KV cache across rounds to retract)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of {PAUSE_MODES}")
        self._paused = True
        if mode == "abort":
            self.abort_all()

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def abort_all(self) -> int:
        """End every running and queued request with finish reason ``abort``; returns how many."""
        if self._running:
            self._abort_running.set()
        return len(self._running) + self.abort_pending()

    def abort_rid(self, rid: str) -> None:
        hit = [p for p in self._pending if p.rid == rid]
        for p in hit:
            self._finish_aborted(p)
        self._pending = [p for p in self._pending if p.rid != rid]
        if any(p.rid == rid for p in self._running):
            # Rows share one forward, so aborting one running row aborts its round; the
            # others come back with finish reason abort and the client retries them.
            self._abort_running.set()

    def abort_pending(self) -> int:
        pending, self._pending = self._pending, []
        for p in pending:
            self._finish_aborted(p)
        return len(pending)

    def _finish_aborted(self, p: _Pending) -> None:
        if not p.future.done():
            p.future.set_result(
                Completion([], [], FINISH_ABORT, self.engine.weight_version, None)
            )

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self._paused:
                batch = [p for p in self._pending[: self.max_batch_size] if not p.future.done()]
                self._pending = self._pending[self.max_batch_size :]
                if not batch:
                    continue
                async with self.model_lock:
                    self._abort_running.clear()
                    self._running = batch
                    try:
                        done = await loop.run_in_executor(
                            self._executor,
                            self.engine.generate_rows,
                            [p.row for p in batch],
                            self._abort_running.is_set,
                        )
                    except Exception as err:  # an engine error fails this round's requests, not the server
                        logger.exception("batch of %d rows failed", len(batch))
                        for p in batch:
                            if not p.future.done():
                                p.future.set_exception(err)
                        continue
                    finally:
                        self._running = []
                for p, completion in zip(batch, done):
                    if not p.future.done():
                        p.future.set_result(completion)
