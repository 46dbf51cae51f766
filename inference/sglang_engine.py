"""The SGLang rollout engine: servers launched (or reached) over HTTP behind one RolloutEngine.

    engine = SGLangEngine.launch(ServerConfig(model_path=..., kind="sglang", num_servers=8, tp_size=1),
                                 weight_sync=WeightSyncConfig(transport="tensor"))
    groups = engine.generate(prompts, n=8, sampling=SamplingParams(temperature=1.0, seed=step))
    engine.update_weights(export_hf_weights(model, bucket_bytes=...), version=step + 1)

The trainer's thread stays synchronous: the async client lives on a private event-loop
thread and every call waits for its result there. Weight updates iterate the stream in
the caller's thread (the exporter may run collectives; a distributed broadcast must come
from the trainer) and hand each bucket to the loop (:mod:`inference.weight_sync`).

If an update fails after some buckets were loaded, the servers hold a mix of old and
new weights: they stay paused and :meth:`generate` refuses until an update succeeds,
so no rollout is ever sampled from a half-updated model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Iterator, Sequence

from inference.engine import Completion, EngineClosedError, RolloutEngine, SamplingParams, WeightStream
from inference.launcher import Launcher, ServerConfig, free_port
from inference.server_handle import ServerHandle
from inference.sglang_client import ClientConfig, SGLangClient
from inference.weight_group import broadcast_tensors, join_weight_group, leave_weight_group
from inference.weight_stream import iter_buckets, save_stream_to_dir
from inference.weight_sync import WeightSync, WeightSyncConfig

logger = logging.getLogger(__name__)


class _LoopThread:
    """An asyncio loop on a daemon thread; ``run`` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sglang-client", daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait(self, future: concurrent.futures.Future, timeout: float | None = None) -> Any:
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            raise EngineClosedError("the SGLang engine was closed while a call was in flight") from None
        except BaseException:
            future.cancel()  # KeyboardInterrupt or a timeout here must not leave the call running
            raise

    def run(self, coro, timeout: float | None = None) -> Any:
        return self.wait(self.submit(coro), timeout)

    def stop(self) -> None:
        async def cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            self.run(cancel_rest(), timeout=30.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30.0)
        if not self.loop.is_running():
            self.loop.close()


def _with_last(items: Iterator) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


class SGLangEngine(RolloutEngine):
    """RolloutEngine over SGLang-protocol servers (real SGLang, or the CPU stand-in).

    ``workers``: handles of the servers (see :meth:`launch` and :meth:`connect`);
    ``router_url``: the sglang-router in front of them, or None for client round-robin.
    """

    def __init__(
        self,
        workers: Sequence[ServerHandle],
        router_url: str | None = None,
        *,
        client: ClientConfig | None = None,
        weight_sync: WeightSyncConfig | None = None,
        launcher: Launcher | None = None,
    ):
        self._launcher = launcher
        self._loop = _LoopThread()
        self.client = SGLangClient(workers, router_url, client)
        self._sync = WeightSync(self.client, weight_sync or WeightSyncConfig())
        self._version = 0
        self._inconsistent: str | None = None
        self._closed = False
        self._update_lock = threading.Lock()
        self._loop.run(self.client.start())

    @classmethod
    def launch(cls, server: ServerConfig, *, client: ClientConfig | None = None,
               weight_sync: WeightSyncConfig | None = None) -> "SGLangEngine":
        """Start servers (and the router) per ``server`` and connect to them."""
        launcher = Launcher(server)
        workers, router_url = launcher.start()
        try:
            return cls(workers, router_url, client=client, weight_sync=weight_sync, launcher=launcher)
        except BaseException:
            launcher.stop()
            raise

    @classmethod
    def connect(cls, worker_urls: Sequence[str], router_url: str | None = None, **kwargs) -> "SGLangEngine":
        """Use servers started elsewhere (e.g. by Slurm); their health comes from /health."""
        workers = [ServerHandle(url.rstrip("/"), f"server-{i}") for i, url in enumerate(worker_urls)]
        return cls(workers, router_url, **kwargs)

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def workers(self) -> list[ServerHandle]:
        return list(self.client.workers)

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineClosedError("the SGLang engine is closed")
        if self._inconsistent:
            raise RuntimeError(
                f"rollout servers hold partially updated weights after a failed update_weights "
                f"({self._inconsistent}); they stay paused until update_weights succeeds"
            )

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._check_usable()
        return self._loop.run(self.client.generate(prompt_token_ids, n, sampling))

    async def agenerate(self, prompt_token_ids, n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """generate() for callers that run their own event loop (awaits on the engine's loop)."""
        self._check_usable()
        future = self._loop.submit(self.client.generate(prompt_token_ids, n, sampling))
        return await asyncio.wrap_future(future)

    # ------------------------------------------------------------------ weights

    def update_weights(self, stream: WeightStream, *, version: int | None = None) -> int:
        """pause -> flush -> load every bucket on every worker -> continue; returns the new version."""
        if self._closed:
            raise EngineClosedError("the SGLang engine is closed")
        new_version = int(version) if version is not None else self._version + 1
        cfg = self._sync.config
        with self._update_lock:
            try:
                self._loop.run(self._sync.pause_and_flush())
            except BaseException:
                self._resume_quietly()
                raise
            loaded, sent = 0, False
            try:
                if cfg.transport == "disk":
                    if not cfg.disk_dir:
                        raise ValueError("WeightSyncConfig.disk_dir must name a directory every server can read")
                    loaded = save_stream_to_dir(stream, cfg.disk_dir, cfg.bucket_bytes)
                    if loaded:
                        sent = True
                        self._loop.run(self._sync.load_from_disk(cfg.disk_dir, new_version))
                else:
                    for bucket, last in _with_last(iter_buckets(stream, cfg.bucket_bytes)):
                        tag = new_version if last else None
                        sent = True
                        if cfg.transport == "tensor":
                            self._loop.run(self._sync.send_tensor_bucket(bucket, tag))
                        else:
                            self._send_distributed_bucket(bucket, tag)
                        loaded += len(bucket)
                if loaded == 0:
                    raise ValueError("weight update stream was empty; nothing was loaded")
            except BaseException as err:
                # Once a bucket went out, some server may hold some new tensors: never let
                # it generate from that mix. Before that, the old weights are intact.
                if sent:
                    self._inconsistent = f"{type(err).__name__}: {err}"
                else:
                    self._resume_quietly()
                raise
            self._loop.run(self._sync.resume())
            self._version = new_version
            self._inconsistent = None
            logger.info("pushed %d tensors to %d servers, weight version %d", loaded, len(self.client.live_workers), new_version)
            return new_version

    def _resume_quietly(self) -> None:
        """After a failed update that loaded nothing, let the surviving servers generate again."""
        try:
            self._loop.run(self._sync.resume(), timeout=60.0)
        except Exception as err:  # the original failure is the one to report
            logger.warning("could not resume generation after a failed weight update: %s", err)

    def _send_distributed_bucket(self, bucket, version: int | None) -> None:
        if self._sync.group is None:
            self._init_group()
        tensors = [t.detach().contiguous() for _, t in bucket]
        # Servers must be receiving before rank 0 broadcasts: announce, then send, then wait.
        announced = self._loop.submit(self._sync.announce_distributed_bucket(list(zip([n for n, _ in bucket], tensors)), version))
        try:
            broadcast_tensors(self._sync.group, tensors)
        except BaseException:
            announced.cancel()
            raise
        self._loop.wait(announced)

    def _init_group(self) -> None:
        cfg = self._sync.config
        offsets, world_size = self._loop.run(self._sync.group_layout())
        address = self._sync.master_address()
        port = cfg.master_port or free_port("0.0.0.0")
        joined = self._loop.submit(self._sync.init_group_requests(address, port, offsets, world_size))
        try:
            group = join_weight_group(address, port, 0, world_size, cfg.group_name, cfg.backend)
        except BaseException:
            joined.cancel()
            raise
        self._loop.wait(joined)
        self._sync.group = group
        logger.info("weight group %r ready: trainer + %d server ranks at %s:%d", cfg.group_name, world_size - 1, address, port)

    # ------------------------------------------------------------------ memory

    def release_memory(self) -> None:
        """/release_memory_occupation on every worker (SGLang needs --enable-memory-saver)."""
        self._check_usable()
        self._loop.run(self.client.call_all("/release_memory_occupation", {}))

    def resume_memory(self) -> None:
        self._check_usable()
        self._loop.run(self.client.call_all("/resume_memory_occupation", {}))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[list[float]]:
        """SGLang's /get_weights_by_name on every worker: the first ``truncate_size`` values, flattened."""
        body = {"name": name, "truncate_size": truncate_size}
        return self._loop.run(self.client.call_all("/get_weights_by_name", body))

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Abort in-flight requests, leave the weight group, stop launched processes. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._sync.group is not None:
                try:
                    self._loop.run(self._sync.destroy_group(), timeout=10.0)
                except Exception as err:  # servers may be gone already; the trainer's side must still go
                    logger.warning("destroying the weight group on the servers failed: %s", err)
                leave_weight_group(self._sync.group)
                self._sync.group = None
            self._loop.run(self.client.close(), timeout=30.0)
        finally:
            self._loop.stop()
            if self._launcher is not None:
                self._launcher.stop()
