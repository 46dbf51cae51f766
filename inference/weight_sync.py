"""Weight updates on SGLang servers: pause -> flush cache -> update -> continue, per transport.

Three transports, one per deployment:

- ``tensor`` (colocated): each bucket is posted to ``/update_weights_from_tensor``.
  Real SGLang gets its ``MultiprocessingSerializer`` payload (CUDA IPC handles, same
  node only); the stand-in gets base64 safetensors (see :mod:`inference.protocol`).
  ``tensor_format="auto"`` asks each server's ``/get_server_info`` which it is.
- ``distributed`` (disaggregated): servers join a process group with the trainer as
  rank 0 (``/init_weights_update_group``, once); per bucket, ``/update_weights_from_distributed``
  announces names/dtypes/shapes and the trainer broadcasts the tensors in that order.
- ``disk``: the stream is written as safetensors shards to a directory every server can
  read, then ``/update_weights_from_disk`` loads it.

The weight version goes with the last bucket only, so a server reports the new
version exactly when all of it is loaded. The bucket loop itself runs in the caller's
thread (:class:`~inference.sglang_engine.SGLangEngine`): iterating the exporter may run
collectives, and the broadcast must come from the trainer's thread; the coroutines here
are the HTTP halves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from inference.protocol import (
    SERVER_KIND_KEY,
    STAND_IN_TENSOR_FORMAT,
    dtype_to_wire,
    encode_bucket_safetensors,
    encode_bucket_sglang,
)
from inference.server_handle import ServerHandle
from inference.sglang_client import RolloutRequestError, SGLangClient
from inference.weight_stream import DEFAULT_BUCKET_BYTES, NamedTensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightSyncConfig:
    transport: Literal["tensor", "distributed", "disk"] = "tensor"
    tensor_format: Literal["auto", "sglang", "safetensors"] = "auto"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    # /pause_generation mode: "abort" ends in-flight requests (the client re-sends them,
    # so they are sampled with the new weights); "retract"/"in_place" keep them.
    pause_mode: str = "abort"
    master_address: str | None = None
    master_port: int | None = None
    backend: str = "nccl"
    group_name: str = "weight_update_group"
    disk_dir: str | None = None
    flush_retries: int = 50

    def __post_init__(self) -> None:
        if self.transport not in ("tensor", "distributed", "disk"):
            raise ValueError(f"WeightSyncConfig.transport must be tensor, distributed or disk, got {self.transport!r}")
        if self.tensor_format not in ("auto", "sglang", "safetensors"):
            raise ValueError(f"WeightSyncConfig.tensor_format must be auto, sglang or safetensors, got {self.tensor_format!r}")
        if self.pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"WeightSyncConfig.pause_mode must be abort, retract or in_place, got {self.pause_mode!r}")


class WeightSync:
    """The HTTP side of weight updates for every live worker of one client."""

    def __init__(self, client: SGLangClient, config: WeightSyncConfig):
        self.client = client
        self.config = config
        self._info: dict[str, dict] = {}
        self.group = None

    async def server_info(self, worker: ServerHandle) -> dict:
        if worker.url not in self._info:
            self._info[worker.url] = await self.client.call(worker, "/get_server_info", method="GET", retries=2) or {}
        return self._info[worker.url]

    # ------------------------------------------------------------------ around every update

    async def pause_and_flush(self) -> None:
        await self.client.call_all("/pause_generation", {"mode": self.config.pause_mode}, retries=2)
        await asyncio.gather(*(self._flush(w) for w in self.client.live_workers))

    async def _flush(self, worker: ServerHandle) -> None:
        # SGLang refuses to flush while aborted requests are still draining; that takes
        # a few scheduler steps, so retry briefly before calling it a failure.
        for attempt in range(self.config.flush_retries):
            try:
                await self.client.call(worker, "/flush_cache", retries=2)
                return
            except RolloutRequestError:
                if attempt == self.config.flush_retries - 1:
                    raise
                await asyncio.sleep(0.1)

    async def resume(self) -> None:
        await self.client.call_all("/continue_generation", {}, retries=2)

    # ------------------------------------------------------------------ tensor

    async def _format(self, worker: ServerHandle) -> tuple[str, int]:
        """(payload format, TP size) of a worker; asks /get_server_info only when it must."""
        fmt = self.config.tensor_format
        if fmt == "safetensors":
            return fmt, 1
        info = await self.server_info(worker)
        if fmt == "auto":
            fmt = "safetensors" if info.get(SERVER_KIND_KEY) else "sglang"
        return fmt, int(info.get("tp_size", 1))

    async def send_tensor_bucket(self, bucket: list[NamedTensor], version: int | None) -> None:
        workers = self.client.live_workers
        formats = [await self._format(w) for w in workers]
        payloads: dict[tuple[str, int], tuple[list[str], str | None]] = {}
        for fmt, tp in set(formats):
            if fmt == "safetensors":
                encoded = await asyncio.to_thread(encode_bucket_safetensors, bucket)
                payloads[(fmt, tp)] = ([encoded], STAND_IN_TENSOR_FORMAT)
            else:
                payloads[(fmt, tp)] = (encode_bucket_sglang(bucket, tp), None)

        async def send(worker, key):
            entries, load_format = payloads[key]
            body = {
                "serialized_named_tensors": entries,
                "load_format": load_format,
                "flush_cache": version is not None,
                "abort_all_requests": False,
                "weight_version": None if version is None else str(version),
            }
            await self.client.call(worker, "/update_weights_from_tensor", body)

        await asyncio.gather(*(send(w, key) for w, key in zip(workers, formats)))

    # ------------------------------------------------------------------ distributed

    async def group_layout(self) -> tuple[list[int], int]:
        """Rank offset of each live worker and the group's world size (trainer = rank 0)."""
        offsets, next_rank = [], 1
        for worker in self.client.live_workers:
            offsets.append(next_rank)
            next_rank += int((await self.server_info(worker)).get("tp_size", 1))
        return offsets, next_rank

    def master_address(self) -> str:
        if self.config.master_address:
            return self.config.master_address
        hosts = {urlparse(w.url).hostname for w in self.client.workers}
        if hosts <= {"127.0.0.1", "localhost"}:
            return "127.0.0.1"
        return socket.gethostbyname(socket.gethostname())

    async def init_group_requests(self, master_address: str, master_port: int, offsets: list[int], world_size: int) -> None:
        """Ask every worker to join the group; returns once all of them joined."""
        await asyncio.gather(*(
            self.client.call(w, "/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port, "rank_offset": offset,
                "world_size": world_size, "group_name": self.config.group_name, "backend": self.config.backend,
            })
            for w, offset in zip(self.client.live_workers, offsets)
        ))

    async def announce_distributed_bucket(self, bucket: list[NamedTensor], version: int | None) -> None:
        body = {
            "names": [name for name, _ in bucket],
            "dtypes": [dtype_to_wire(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.config.group_name,
            "flush_cache": version is not None,
            "abort_all_requests": False,
            "weight_version": None if version is None else str(version),
        }
        await self.client.call_all("/update_weights_from_distributed", body)

    async def destroy_group(self) -> None:
        await self.client.call_all("/destroy_weights_update_group", {"group_name": self.config.group_name})

    # ------------------------------------------------------------------ disk

    async def load_from_disk(self, path: str, version: int) -> None:
        body = {"model_path": path, "weight_version": str(version), "abort_all_requests": False}
        await self.client.call_all("/update_weights_from_disk", body)
