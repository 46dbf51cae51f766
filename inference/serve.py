"""`groupwise serve`: the embedded engine behind SGLang's HTTP protocol — the CPU stand-in for SGLang workers.

On a machine without GPUs SGLang cannot run, yet the server path — launcher, the real
``sglang-router``, the async client, weight sync, memory release — is what a
cluster run exercises. This server answers the SGLang endpoints that path uses with the
same JSON shapes (:mod:`inference.protocol`, SGLang v0.5.5), with a real model
generating, so everything else talks to it exactly as to SGLang:

    python -m inference.serve --model PATH --port N [--host H] [--dtype float32]

Endpoints: ``/health``, ``/health_generate``, ``/generate``, ``/flush_cache``,
``/pause_generation``, ``/continue_generation``, ``/abort_request``,
``/update_weights_from_tensor``, ``/update_weights_from_disk``,
``/init_weights_update_group``, ``/update_weights_from_distributed``,
``/destroy_weights_update_group``, ``/get_weights_by_name``,
``/release_memory_occupation``, ``/resume_memory_occupation``, ``/get_server_info``
(``/server_info``), ``/get_model_info`` (``/model_info``), ``/get_weight_version``,
``/update_weight_version``.

Where it differs from SGLang, by design: one TP rank; requests are batched in rounds,
not continuously (:mod:`inference.serve_scheduler`); tensor payloads use the safe
safetensors encoding (``load_format="groupwise_safetensors_b64"``, see
:mod:`inference.protocol`); the distributed weight group runs over gloo; ``/generate``
takes ``input_ids`` only (``text`` needs SGLang's tokenizer manager); and it has no
prefix cache, so ``/flush_cache`` only checks that nothing is running, as SGLang does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from typing import Any, Sequence

from aiohttp import web

from inference.embedded import DTYPES, EmbeddedEngine, RowRequest
from inference.engine import fresh_seed
from inference.protocol import (
    SERVER_KIND_KEY,
    SGLANG_VERSION,
    STAND_IN_TENSOR_FORMAT,
    ProtocolError,
    completion_to_wire,
    decode_bucket_safetensors,
    dtype_from_wire,
    parse_weight_version,
    sampling_from_wire,
)
from inference.serve_scheduler import BatchScheduler
from inference.weight_group import broadcast_tensors, join_weight_group, leave_weight_group
from inference.weight_stream import iter_safetensors_dir

logger = logging.getLogger("inference.serve")


def _error(message: str, status: int = 400) -> web.Response:
    """SGLang's error body (``_create_error_response``)."""
    return web.json_response({"error": {"message": message}}, status=status)


def _result(success: bool, message: str, **extra) -> web.Response:
    """SGLang's weight-update body: ``{success, message}``, 400 on failure."""
    return web.json_response({"success": success, "message": message, **extra}, status=200 if success else 400)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as err:
        raise ProtocolError(f"{request.path}: body is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise ProtocolError(f"{request.path}: body must be a JSON object")
    return body


class StandInServer:
    """The HTTP face of one EmbeddedEngine. Build with :meth:`app`, serve with aiohttp."""

    def __init__(self, engine: EmbeddedEngine, *, model_path: str, max_batch_size: int, dtype: str):
        self.engine = engine
        self.model_path = model_path
        self.dtype = dtype
        self.scheduler: BatchScheduler | None = None
        self.max_batch_size = max_batch_size
        self.groups: dict[str, Any] = {}
        self.groups_backend: dict[str, str] = {}
        self.started = time.time()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 34, middlewares=[self._errors])
        r = app.router
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health)
        for path in ("/get_model_info", "/model_info"):
            r.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.server_info)
        r.add_get("/get_weight_version", self.get_weight_version)
        r.add_route("*", "/generate", self.generate)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        r.add_route("*", "/get_weights_by_name", self.get_weights_by_name)
        r.add_route("*", "/release_memory_occupation", self.release_memory_occupation)
        r.add_route("*", "/resume_memory_occupation", self.resume_memory_occupation)
        r.add_post("/update_weight_version", self.update_weight_version)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self.scheduler = BatchScheduler(self.engine, self.max_batch_size)
        self.scheduler.start()

    async def _on_shutdown(self, app) -> None:
        await self.scheduler.stop()

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ProtocolError as err:
            return _error(str(err))

    # ------------------------------------------------------------------ info

    async def health(self, request):
        return web.Response(status=200)

    def _version(self) -> str:
        return str(self.engine.weight_version)

    async def model_info(self, request):
        return web.json_response(
            {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
             "weight_version": self._version()}
        )

    async def server_info(self, request):
        return web.json_response(
            {"model_path": self.model_path, "tp_size": 1, "dp_size": 1, "dtype": self.dtype,
             "device": str(self.engine.device), "max_running_requests": self.max_batch_size,
             "weight_version": self._version(), "version": f"groupwise-serve (SGLang {SGLANG_VERSION} protocol)",
             SERVER_KIND_KEY: True, "memory_released": self.engine.released,
             "uptime_s": time.time() - self.started}
        )

    async def get_weight_version(self, request):
        return web.json_response({"weight_version": self._version()})

    # ------------------------------------------------------------------ generation

    async def generate(self, request):
        body = await _body(request)
        if body.get("stream"):
            raise ProtocolError("stream=true is not supported by the stand-in server")
        start = body.get("logprob_start_len")
        if body.get("top_logprobs_num") or body.get("return_input_logprob") or (start is not None and start >= 0):
            raise ProtocolError("the stand-in server returns output-token log-probs only")
        ids = body.get("input_ids")
        if ids is None:
            raise ProtocolError("/generate needs input_ids (the stand-in has no text tokenizer manager)")
        single = bool(ids) and not isinstance(ids[0], list)
        prompts: list[Sequence[int]] = [ids] if single else ids
        params = body.get("sampling_params")
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ProtocolError(f"{len(params)} sampling_params for {len(prompts)} input_ids")
        rid = body.get("rid") or uuid.uuid4().hex
        rids = rid if isinstance(rid, list) else ([rid] if single else [f"{rid}-{i}" for i in range(len(prompts))])
        rows = []
        for p, (prompt, wire) in enumerate(zip(prompts, params)):
            sampling, seed = sampling_from_wire(wire)
            try:
                self.engine.check_prompt(p, prompt)
            except ValueError as err:
                raise ProtocolError(str(err)) from err
            rows.append((RowRequest(list(prompt), sampling, seed if seed is not None else fresh_seed()), rids[p]))
        try:
            done = await self.scheduler.submit(rows)
        except (RuntimeError, ValueError) as err:
            return _error(str(err))
        out = [
            completion_to_wire(c, rid=r, prompt_tokens=len(row.prompt_token_ids), text=self._text(c.token_ids))
            for c, (row, r) in zip(done, rows)
        ]
        return web.json_response(out[0] if single else out)

    def _text(self, ids: list[int]) -> str:
        return self.engine.tokenizer.decode(ids) if self.engine.tokenizer is not None and ids else ""

    async def flush_cache(self, request):
        if self.scheduler.busy:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.\n")
        return web.Response(status=200, text="Cache flushed.\n")

    async def pause_generation(self, request):
        body = await _body(request)
        try:
            self.scheduler.pause(body.get("mode", "abort"))
        except ValueError as err:
            raise ProtocolError(str(err)) from err
        logger.info("generation paused (mode=%s)", body.get("mode", "abort"))
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request):
        self.scheduler.resume()
        logger.info("generation continued")
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def abort_request(self, request):
        body = await _body(request)
        if body.get("abort_all"):
            logger.info("aborted %d requests", self.scheduler.abort_all())
        elif body.get("rid"):
            self.scheduler.abort_rid(body["rid"])
        return web.Response(status=200)

    # ------------------------------------------------------------------ weights

    async def _load(self, bucket_source, body: dict, what: str) -> tuple[bool, str]:
        """Load weights on the engine thread; the version changes only when one is given (as SGLang)."""
        if body.get("abort_all_requests"):
            self.scheduler.abort_all()
        weight_version = body.get("weight_version")
        version = parse_weight_version(weight_version) if weight_version is not None else self.engine.weight_version
        try:
            await self.scheduler.run_exclusive(lambda: self.engine.update_weights(bucket_source(), version=version))
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as err:
            message = f"{what} failed: {err.args[0] if isinstance(err, KeyError) else err}"
            logger.error(message)
            return False, message
        logger.info("%s: weight version %s", what, self._version())
        return True, f"Succeeded to update model weights. Weight version {self._version()}."

    async def update_weights_from_tensor(self, request):
        body = await _body(request)
        if body.get("load_format") != STAND_IN_TENSOR_FORMAT:
            return _result(
                False,
                f"load_format={body.get('load_format')!r}: the stand-in server decodes only "
                f"{STAND_IN_TENSOR_FORMAT!r} (base64 safetensors); SGLang's pickled CUDA-IPC payloads "
                "cannot cross HTTP on CPU",
            )
        entries = body.get("serialized_named_tensors") or []
        if not entries:
            return _result(False, "serialized_named_tensors is empty")
        # One entry per TP rank; the stand-in is TP rank 0 of 1.
        bucket = decode_bucket_safetensors(entries[0])
        return _result(*await self._load(lambda: [bucket], body, "update_weights_from_tensor"))

    async def update_weights_from_disk(self, request):
        body = await _body(request)
        path = body.get("model_path")
        if not path:
            return _result(False, "model_path is required", num_paused_requests=0)
        ok, message = await self._load(lambda: iter_safetensors_dir(path), body, "update_weights_from_disk")
        return _result(ok, message, num_paused_requests=0)

    async def init_weights_update_group(self, request):
        body = await _body(request)
        name = body.get("group_name", "weight_update_group")
        backend = body.get("backend", "nccl")
        if self.engine.device.type == "cpu" and backend != "gloo":
            return _result(False, f"backend={backend!r}: the stand-in server runs on CPU; use backend='gloo'")
        try:
            # Blocks until the trainer joins; a thread keeps /health and generation alive meanwhile.
            group = await asyncio.to_thread(
                join_weight_group, body["master_address"], int(body["master_port"]),
                int(body["rank_offset"]), int(body["world_size"]), name, backend,
                float(body.get("timeout_s", 300.0)),
            )
        except (KeyError, RuntimeError, ValueError) as err:
            return _result(False, f"init_weights_update_group failed: {err!r}")
        self.groups[name] = group
        self.groups_backend[name] = backend
        logger.info("joined weight group %r as rank %s of %s", name, body["rank_offset"], body["world_size"])
        return _result(True, "Succeeded to initialize custom process group.")

    async def update_weights_from_distributed(self, request):
        body = await _body(request)
        name = body.get("group_name", "weight_update_group")
        group = self.groups.get(name)
        if group is None:
            return _result(False, f"no weight group {name!r}; call /init_weights_update_group first")
        names, dtypes, shapes = body.get("names", []), body.get("dtypes", []), body.get("shapes", [])
        if not (len(names) == len(dtypes) == len(shapes)) or not names:
            return _result(False, "names, dtypes and shapes must be non-empty and of equal length")

        # NCCL receives into device memory; gloo into host memory.
        device = self.engine.device if self.groups_backend.get(name) == "nccl" else "cpu"

        def receive():
            import torch

            tensors = [torch.empty(shape, dtype=dtype_from_wire(d), device=device) for shape, d in zip(shapes, dtypes)]
            broadcast_tensors(group, tensors)
            return [list(zip(names, tensors))]

        # Receiving must not wait behind a long batch while the trainer blocks in broadcast,
        # but it must not race a batch either: take the model lock, receive, then load.
        return _result(*await self._load(receive, body, "update_weights_from_distributed"))

    async def destroy_weights_update_group(self, request):
        body = await _body(request)
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is not None:
            await asyncio.to_thread(leave_weight_group, group)
        return _result(True, "Succeeded to destroy custom process group.")

    async def get_weights_by_name(self, request):
        body = await _body(request)
        name = body.get("name")
        tensor = self.engine.named_weights().get(name)
        if tensor is None:
            return _error(f"Get parameter by name failed: no parameter {name!r}")
        return web.json_response(tensor.flatten()[: int(body.get("truncate_size", 100))].float().tolist())

    async def update_weight_version(self, request):
        body = await _body(request)
        version = parse_weight_version(body.get("new_version"))
        if body.get("abort_all_requests"):
            self.scheduler.abort_all()
        self.engine.set_weight_version(version)
        return web.json_response({"success": True, "message": f"Weight version updated to {version}",
                                  "new_version": str(version)})

    # ------------------------------------------------------------------ memory

    async def release_memory_occupation(self, request):
        await self.scheduler.run_exclusive(self.engine.release_memory)
        logger.info("memory released")
        return web.Response(status=200)

    async def resume_memory_occupation(self, request):
        await self.scheduler.run_exclusive(self.engine.resume_memory)
        logger.info("memory resumed")
        return web.Response(status=200)


class _DropHttp2Probe(logging.Filter):
    """sglang-router first probes workers with an HTTP/2 preface; aiohttp logs each
    rejected probe as an error with a traceback. It is expected, so keep it out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and type(exc).__name__ == "BadHttpMessage" and "PRI" in str(exc))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="groupwise serve",
        description="Serve a Hugging Face causal LM over SGLang's HTTP protocol on CPU "
        "(the stand-in for SGLang workers).",
    )
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--max-batch-size", type=int, default=64, help="rows per forward (SGLang: --max-running-requests)")
    parser.add_argument("--weight-version", default="0", help="initial weight version (SGLang: --weight-version)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("aiohttp.server").addFilter(_DropHttp2Probe())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if args.num_threads > 0:
        import torch

        torch.set_num_threads(args.num_threads)
    engine = EmbeddedEngine.from_pretrained(
        args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
        weight_version=parse_weight_version(args.weight_version),
    )
    server = StandInServer(engine, model_path=args.model, max_batch_size=args.max_batch_size, dtype=args.dtype)
    logger.info("serving %s on http://%s:%d (SGLang %s protocol)", args.model, args.host, args.port, SGLANG_VERSION)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, handle_signals=True, shutdown_timeout=5.0)
    # The app has shut down cleanly; interpreter finalisation with torch loaded takes
    # seconds more and holds nothing worth flushing, so skip it (launchers stop faster).
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
