"""Launch rollout servers as subprocesses, wait until they answer, and put a router in front.

Two server kinds share one launcher:

- ``sglang``: ``python -m sglang.launch_server`` (GPU). The options the pipeline needs are
  typed fields (model path, TP, memory fraction, host/port, dtype, GPU placement); any other
  SGLang option goes through ``extra_args`` untouched, so nothing is re-declared here.
- ``stand-in``: ``python -m inference.serve`` (``groupwise serve``), the CPU stand-in that
  speaks the same protocol (:mod:`inference.serve`).

Layouts: ``colocated`` servers share GPUs with the trainer, so they need SGLang's memory
saver to release/resume memory around training (and a CPU backup of the weights, so a
resume brings them back, as :meth:`RolloutEngine.resume_memory` promises);
``disaggregated`` servers own their GPUs and take weights over NCCL.

Generation goes through ``sglang-router`` (``python -m sglang_router.launch_router
--worker-urls ... --policy round_robin``) when it is importable, else the client
round-robins over the workers itself. A server that exits while starting fails the
launch at once with its exit code and last log lines; one that never answers fails it
after ``health_timeout_s``. Processes run in their own session and are stopped as a
group (SIGTERM, then SIGKILL), so nothing outlives :meth:`Launcher.stop`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.server_handle import ServerDiedError, ServerHandle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """How to launch ``num_servers`` rollout servers on this node (one per ``tp_size`` GPUs)."""

    model_path: str
    kind: Literal["sglang", "stand-in"] = "stand-in"
    layout: Literal["colocated", "disaggregated"] = "colocated"
    num_servers: int = 1
    tp_size: int = 1
    mem_fraction_static: float | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    base_port: int | None = None
    base_gpu_id: int = 0
    weights_cpu_backup: bool = True
    deterministic: bool = True
    extra_args: tuple[str, ...] = ()
    stand_in_threads: int = 1
    stand_in_max_batch_size: int = 64
    use_router: bool | None = None
    router_port: int | None = None
    router_args: tuple[str, ...] = ()
    log_dir: str | None = None
    health_timeout_s: float = 900.0
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.kind not in ("sglang", "stand-in"):
            raise ValueError(f"ServerConfig.kind must be 'sglang' or 'stand-in', got {self.kind!r}")
        if self.layout not in ("colocated", "disaggregated"):
            raise ValueError(f"ServerConfig.layout must be 'colocated' or 'disaggregated', got {self.layout!r}")
        if self.num_servers < 1 or self.tp_size < 1:
            raise ValueError(f"ServerConfig.num_servers and tp_size must be >= 1, got {self.num_servers}, {self.tp_size}")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"ServerConfig.mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")


def sglang_server_command(cfg: ServerConfig, index: int, port: int) -> list[str]:
    """``python -m sglang.launch_server ...`` for server ``index`` of ``cfg``."""
    cmd = [
        cfg.python, "-m", "sglang.launch_server",
        "--model-path", cfg.model_path,
        "--host", cfg.host,
        "--port", str(port),
        "--tp-size", str(cfg.tp_size),
        "--base-gpu-id", str(cfg.base_gpu_id + index * cfg.tp_size),
        # Completions record the version they were sampled with; start counting at 0.
        "--weight-version", "0",
    ]
    if cfg.dtype is not None:
        cmd += ["--dtype", cfg.dtype]
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.deterministic:
        # SGLang honours a request's sampling_seed only in deterministic mode.
        cmd += ["--enable-deterministic-inference"]
    if cfg.layout == "colocated":
        cmd += ["--enable-memory-saver"]
        if cfg.weights_cpu_backup:
            cmd += ["--enable-weights-cpu-backup"]
    return cmd + list(cfg.extra_args)


def stand_in_command(cfg: ServerConfig, index: int, port: int) -> list[str]:
    """``python -m inference.serve ...`` for server ``index`` of ``cfg``."""
    cmd = [
        cfg.python, "-m", "inference.serve",
        "--model", cfg.model_path,
        "--host", cfg.host,
        "--port", str(port),
        "--dtype", cfg.dtype or "float32",
        "--weight-version", "0",
        "--max-batch-size", str(cfg.stand_in_max_batch_size),
        "--num-threads", str(cfg.stand_in_threads),
    ]
    return cmd + list(cfg.extra_args)


def router_command(cfg: ServerConfig, worker_urls: list[str], port: int) -> list[str]:
    return [
        cfg.python, "-m", "sglang_router.launch_router",
        "--worker-urls", *worker_urls,
        "--policy", "round_robin",
        "--host", cfg.host,
        "--port", str(port),
        *cfg.router_args,
    ]


def router_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(servers: list[ServerHandle], timeout_s: float, path: str = "/health") -> None:
    """Poll until every server answers ``path`` with 200; fail fast on a process that exits."""
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.alive() is False:
                raise ServerDiedError(server.describe_death() + "\n(it exited while starting)")
            if http_ok(server.url + path):
                waiting.remove(server)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rollout servers not healthy after {timeout_s:.0f}s: "
                + "; ".join(f"{s.name} at {s.url}:\n{s.log_tail()}" for s in waiting)
            )
        time.sleep(0.25)


class Launcher:
    """Starts the servers (and router) of one :class:`ServerConfig`; ``stop`` ends them all."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="groupwise-rollout-"))
        self.servers: list[ServerHandle] = []
        self.router: ServerHandle | None = None

    def command(self, index: int, port: int) -> list[str]:
        build = sglang_server_command if self.cfg.kind == "sglang" else stand_in_command
        return build(self.cfg, index, port)

    def _spawn(self, name: str, cmd: list[str], url: str) -> ServerHandle:
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.cfg.env}
        # The child imports `inference` from wherever this process does.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        logger.info("started %s (pid %d): %s", name, process.pid, " ".join(cmd))
        return ServerHandle(url=url, name=name, process=process, log_path=log_path)

    def start(self) -> tuple[list[ServerHandle], str | None]:
        """Launch, wait for health, start the router. Returns (workers, router URL or None)."""
        cfg = self.cfg
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(cfg.num_servers):
                port = cfg.base_port + i if cfg.base_port is not None else free_port(cfg.host)
                url = f"http://{cfg.host}:{port}"
                self.servers.append(self._spawn(f"{cfg.kind}-server-{i}", self.command(i, port), url))
            wait_healthy(self.servers, cfg.health_timeout_s)
            use_router = cfg.use_router if cfg.use_router is not None else router_available()
            if use_router and not router_available():
                raise RuntimeError("ServerConfig.use_router=True but sglang_router is not installed (pip install sglang-router)")
            if use_router:
                port = cfg.router_port or free_port(cfg.host)
                url = f"http://{cfg.host}:{port}"
                self.router = self._spawn("router", router_command(cfg, [s.url for s in self.servers], port), url)
                wait_healthy([self.router], timeout_s=60.0)
                self._wait_router_workers()
            else:
                logger.info("sglang_router not used; the client round-robins over %d workers", len(self.servers))
        except BaseException:
            self.stop()
            raise
        return list(self.servers), self.router.url if self.router else None

    def _wait_router_workers(self, timeout_s: float = 60.0) -> None:
        """The router answers /health before it has registered its workers; wait for them."""
        import json

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.router.alive() is False:
                raise ServerDiedError(self.router.describe_death())
            try:
                with urllib.request.urlopen(self.router.url + "/workers", timeout=2.0) as resp:
                    workers = json.loads(resp.read()).get("workers", [])
                if sum(1 for w in workers if w.get("is_healthy", True)) >= len(self.servers):
                    return
            except (urllib.error.HTTPError, ValueError, AttributeError):
                return  # a router without /workers: its /health is all we can wait for
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"router at {self.router.url} did not register its workers:\n{self.router.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``timeout_s``."""
        handles = ([self.router] if self.router else []) + self.servers
        for h in handles:
            if h.process is not None and h.process.poll() is None:
                _signal_group(h.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for h in handles:
            if h.process is None:
                continue
            try:
                h.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop on SIGTERM; killing it", h.name)
                _signal_group(h.process, signal.SIGKILL)
                h.process.wait(timeout=5.0)
        self.router = None
        self.servers = []


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
