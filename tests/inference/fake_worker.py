"""A worker that speaks SGLang's protocol and misbehaves on purpose, for the client fault tests.

Runs in a thread of the test process (:class:`FakeWorker`) or as a subprocess that a
test can kill (``python -m tests.inference.fake_worker --port N``). ``/generate``
answers a deterministic completion (the prompt's last token + 1, 2, ...) unless a fault
is armed: ``fail`` (HTTP 500), ``drop`` (connection closed mid-request), ``abort``
(finish reason abort), ``sleep_s`` (slow answer), ``reject`` (HTTP 400). Every request
is recorded with its path and body, and the peak number of concurrent ``/generate``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Faults:
    fail: int = 0       # the next N /generate answer HTTP 500
    drop: int = 0       # the next N /generate lose their connection mid-request
    abort: int = 0      # the next N /generate finish with reason abort
    reject: bool = False
    sleep_s: float = 0.0
    fail_paths: dict[str, int] = field(default_factory=dict)  # control path -> HTTP status to answer


class FakeWorkerApp:
    def __init__(self, name: str = "fake"):
        self.name = name
        self.faults = Faults()
        self.calls: list[tuple[str, dict]] = []
        self.generate_calls = 0
        self.active = 0
        self.peak = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        body = await request.json() if request.can_read_body else {}
        self.calls.append((path, body))
        if path in self.faults.fail_paths:
            return web.json_response({"success": False, "message": f"{path} refused by {self.name}"},
                                     status=self.faults.fail_paths[path])
        if path == "/generate":
            return await self.generate(request, body)
        if path == "/health":
            return web.Response(status=200)
        if path == "/get_server_info":
            return web.json_response({"tp_size": 1, "groupwise_stand_in": True})
        if path == "/flush_cache":
            return web.Response(text="Cache flushed.\n")
        if path.startswith("/update_weights"):
            return web.json_response({"success": True, "message": "ok"})
        return web.json_response({"status": "ok"})

    async def generate(self, request: web.Request, body: dict) -> web.StreamResponse:
        self.generate_calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            f = self.faults
            if f.sleep_s:
                await asyncio.sleep(f.sleep_s)
            if f.drop > 0:
                f.drop -= 1
                request.transport.close()  # the client sees the server disconnect mid-request
                return web.Response(status=200)
            if f.fail > 0:
                f.fail -= 1
                return web.Response(status=500, text=f"{self.name}: internal error")
            if f.reject:
                return web.json_response({"error": {"message": f"{self.name}: bad request"}}, status=400)
            n = body["sampling_params"]["max_new_tokens"]
            last = body["input_ids"][-1]
            if f.abort > 0:
                f.abort -= 1
                reason, tokens = {"type": "abort", "message": "paused"}, []
            else:
                reason, tokens = {"type": "length", "length": n}, [last + i + 1 for i in range(n)]
            return web.json_response({
                "text": "", "output_ids": tokens,
                "meta_info": {"id": body.get("rid"), "prompt_tokens": len(body["input_ids"]),
                              "completion_tokens": len(tokens), "weight_version": "0", "finish_reason": reason,
                              "output_token_logprobs": [[-0.5, t, None] for t in tokens],
                              "worker": self.name},
            })
        finally:
            self.active -= 1

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls if p != "/generate"]


class FakeWorker(FakeWorkerApp):
    """A FakeWorkerApp served on its own event loop in a daemon thread."""

    def __init__(self, name: str = "fake"):
        super().__init__(name)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        threading.Thread(target=self._serve, daemon=True).start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        # Stopping must not wait for handlers a test left sleeping.
        self._runner = web.AppRunner(self.app(), shutdown_timeout=0.2)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    args = parser.parse_args()
    print(json.dumps({"fake worker": args.name, "port": args.port}), "ready", flush=True)
    web.run_app(FakeWorkerApp(args.name).app(), host="127.0.0.1", port=args.port, print=None)
    sys.exit(0)
