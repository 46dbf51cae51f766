"""Async HTTP client for SGLang servers (or the stand-in): bounded, timed, retried, abortable.

Generation goes to the router when there is one (it balances and retries across
workers itself), else round-robin over the workers. Control calls (pause, flush,
weight updates, memory) go to every worker directly: sglang-router does not fan them out.

Failure policy, per ``/generate`` request:

- connection errors (refused, reset, dropped mid-response), timeouts and HTTP 5xx are
  retried up to ``max_retries`` times with exponential backoff (jittered); each failure
  also checks the server: a worker whose process exited, or that fails ``/health``, leaves
  the rotation, so the retry goes elsewhere;
- a completion that comes back with finish reason ``abort`` (the server paused for a
  weight update) is sent again, up to ``max_abort_retries`` times: the server holds it
  until generation continues, so it is sampled with the new weights;
- HTTP 4xx is the caller's error and fails at once with the server's message;
- when no worker is left, the error names each dead server and quotes its last log lines.

Every request has a timeout, so no call can hang; :meth:`SGLangClient.close` cancels
what is in flight (callers get :class:`~inference.engine.EngineClosedError`) and asks
the workers to abort their running requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import aiohttp

from inference.engine import FINISH_ABORT, Completion, EngineClosedError, SamplingParams, fresh_seed, row_seed
from inference.protocol import completion_from_wire, generate_request
from inference.server_handle import ServerDiedError, ServerHandle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts in seconds. ``request_timeout_s`` bounds one ``/generate`` attempt (the
    whole completion), so size it for ``max_new_tokens`` at your decode speed."""

    max_concurrency: int = 256
    request_timeout_s: float = 600.0
    control_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    health_timeout_s: float = 5.0
    max_retries: int = 3
    max_abort_retries: int = 8
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    unhealthy_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "request_timeout_s", "control_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClientConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_retries < 0 or self.max_abort_retries < 0:
            raise ValueError("ClientConfig.max_retries and max_abort_retries must be >= 0")


class RolloutRequestError(RuntimeError):
    """A request failed for good: the server refused it, or every retry failed."""


class _Retryable(Exception):
    """An HTTP 5xx answer: the server is up but failed this request."""


class SGLangClient:
    """One aiohttp session over a set of workers (and optionally their router).

    Create and use it inside one event loop; :class:`~inference.sglang_engine.SGLangEngine`
    runs one on a background thread for synchronous callers.
    """

    def __init__(self, workers: Sequence[ServerHandle], router_url: str | None = None, config: ClientConfig | None = None):
        if not workers:
            raise ValueError("SGLangClient needs at least one worker")
        self.workers = list(workers)
        self.router_url = router_url.rstrip("/") if router_url else None
        self.config = config or ClientConfig()
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._rotation = itertools.count()
        self._dead: set[str] = set()
        self._unhealthy_until: dict[str, float] = {}
        self._inflight: set[asyncio.Task] = set()
        self._closed = False
        self.stats = {"requests": 0, "retries": 0, "abort_resends": 0, "dead_servers": 0}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.max_concurrency, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s),
        )

    async def close(self, abort_servers: bool = True) -> None:
        """Cancel in-flight requests, tell live workers to abort theirs, close the session."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if abort_servers and self._session is not None:
            await asyncio.gather(
                *(self._abort_all(w) for w in self.workers if w.url not in self._dead), return_exceptions=True
            )
        if self._session is not None:
            await self._session.close()

    async def _abort_all(self, worker: ServerHandle) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        async with self._session.post(worker.url + "/abort_request", json={"abort_all": True}, timeout=timeout):
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ generation

    async def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """[P] prompts -> [P][n] completions; sample i of prompt p uses row_seed(seed, p, i)."""
        self._reap()
        seed = sampling.seed if sampling.seed is not None else fresh_seed()
        call = uuid.uuid4().hex[:12]
        tasks = [
            self._track(self.generate_one(prompt, sampling, row_seed(seed, p, i), f"{call}-{p}-{i}"))
            for p, prompt in enumerate(prompts)
            for i in range(n)
        ]
        try:
            flat = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._closed:
                raise EngineClosedError("the SGLang engine was closed while generating") from None
            raise
        return [flat[p * n : (p + 1) * n] for p in range(len(prompts))]

    def _track(self, coro) -> asyncio.Task:
        if self._closed:
            coro.close()
            raise EngineClosedError("the SGLang engine is closed")
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def generate_one(self, prompt: Sequence[int], sampling: SamplingParams, seed: int, rid: str) -> Completion:
        """One sequence, with the retry policy of the module docstring."""
        body = generate_request(prompt, sampling, seed, rid)
        failures = aborts = 0
        cfg = self.config
        while True:
            if self._closed:
                raise EngineClosedError("the SGLang engine is closed")
            target = await self._pick_target()
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    data = await self._post_json(target.url + "/generate", body, cfg.request_timeout_s)
            except (aiohttp.ClientError, asyncio.TimeoutError, _Retryable) as err:
                failures += 1
                self.stats["retries"] += 1
                reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                logger.warning("/generate on %s failed (%s); attempt %d of %d", target.name, reason, failures, cfg.max_retries + 1)
                await self._check_after_failure(target)
                if failures > cfg.max_retries:
                    raise RolloutRequestError(
                        f"/generate request {rid} failed {failures} times; last on {target.name} ({target.url}): "
                        f"{reason}{self._death_report()}"
                    ) from err
                await asyncio.sleep(self._backoff(failures))
                continue
            except RolloutRequestError as err:
                raise RolloutRequestError(f"{target.name}: {err}") from None
            completion = completion_from_wire(data, target.name)
            if completion.finish_reason == FINISH_ABORT:
                aborts += 1
                self.stats["abort_resends"] += 1
                if aborts > cfg.max_abort_retries:
                    raise RolloutRequestError(
                        f"/generate request {rid} was aborted by {target.name} {aborts} times "
                        "(servers kept pausing generation); giving up"
                    )
                continue
            return completion

    def _backoff(self, failures: int) -> float:
        base = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** (failures - 1))
        return base * random.uniform(0.75, 1.25)

    async def _post_json(self, url: str, body: dict, timeout_s: float) -> Any:
        async with self._session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            text = await resp.text()
            if resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}: {text[:300]}")
            if resp.status >= 400:
                raise RolloutRequestError(f"HTTP {resp.status} from {url}: {text[:1000]}")
            try:
                return json.loads(text)
            except ValueError as err:
                raise RolloutRequestError(f"{url} answered non-JSON: {text[:300]!r}") from err

    # ------------------------------------------------------------------ server health

    async def _pick_target(self) -> ServerHandle:
        if self.router_url is not None:
            if all(w.url in self._dead for w in self.workers):
                raise ServerDiedError("every rollout server behind the router died:" + self._death_report())
            return ServerHandle(self.router_url, f"router ({len(self.workers)} workers)")
        live = [w for w in self.workers if w.url not in self._dead]
        if not live:
            raise ServerDiedError("every rollout server died:" + self._death_report())
        now = time.monotonic()
        healthy = [w for w in live if self._unhealthy_until.get(w.url, 0.0) <= now] or live
        return healthy[next(self._rotation) % len(healthy)]

    async def _check_after_failure(self, target: ServerHandle) -> None:
        """Mark workers that died; with a router, the failed target is the router, so check them all."""
        suspects = self.workers if target.url == self.router_url else [target]
        for worker in suspects:
            if worker.url in self._dead:
                continue
            alive = worker.alive()
            if alive is None and target is worker:
                alive = await self.healthy(worker)
                if not alive:
                    self._unhealthy_until[worker.url] = time.monotonic() + self.config.unhealthy_cooldown_s
                    logger.error("rollout server %s at %s fails /health; routing around it", worker.name, worker.url)
                continue
            if alive is False:
                self._mark_dead(worker)

    def _reap(self) -> None:
        """Notice launched workers whose process exited, before they cost a failed request.
        (Behind a router, requests would not fail at all: the router retries elsewhere.)"""
        for worker in self.workers:
            if worker.url not in self._dead and worker.alive() is False:
                self._mark_dead(worker)

    def _mark_dead(self, worker: ServerHandle) -> None:
        self._dead.add(worker.url)
        self.stats["dead_servers"] += 1
        logger.error("%s", worker.describe_death())

    def _death_report(self) -> str:
        dead = [w for w in self.workers if w.url in self._dead or w.alive() is False]
        return "".join("\n" + w.describe_death() for w in dead)

    async def healthy(self, worker: ServerHandle) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
            async with self._session.get(worker.url + "/health", timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    @property
    def live_workers(self) -> list[ServerHandle]:
        return [w for w in self.workers if w.url not in self._dead]

    # ------------------------------------------------------------------ control calls

    async def call(self, worker: ServerHandle, path: str, body: dict | None = None, *, method: str = "POST",
                   timeout_s: float | None = None, retries: int = 0) -> Any:
        """One control call to one worker -> parsed JSON (or text, or None). Raises naming the worker."""
        if self._closed:
            raise EngineClosedError("the SGLang engine is closed")
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.config.control_timeout_s)
        for attempt in range(retries + 1):
            try:
                async with self._session.request(method, worker.url + path, json=body, timeout=timeout) as resp:
                    text = await resp.text()
                    if resp.status >= 400:
                        raise RolloutRequestError(f"{worker.name} ({worker.url}): {path} answered HTTP {resp.status}: {text[:1000]}")
                    try:
                        return json.loads(text) if text else None
                    except ValueError:
                        return text
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                if worker.alive() is False or attempt == retries:
                    raise ServerDiedError(
                        f"{path} on {worker.name} ({worker.url}) failed: {type(err).__name__} {err}"
                        + ("\n" + worker.describe_death() if worker.alive() is False else "")
                    ) from err
                await asyncio.sleep(self._backoff(attempt + 1))

    async def call_all(self, path: str, body: dict | None = None, **kwargs) -> list[Any]:
        """The same control call on every live worker, concurrently, in worker order."""
        workers = self.live_workers
        if not workers:
            raise ServerDiedError("no live rollout server:" + self._death_report())
        return list(await asyncio.gather(*(self.call(w, path, body, **kwargs) for w in workers)))
