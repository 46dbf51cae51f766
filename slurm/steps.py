"""The Python half of the sbatch scripts: config, ports, and the rollout-server and router steps.

    python slurm/steps.py config --config F --world N [overrides...]   shell variables of the run
    python slurm/steps.py port                                         a free TCP port on this host
    python slurm/steps.py server --config F --dir D --kind K --layout L [overrides...] [-- ARGS]
    python slurm/steps.py router --dir D --count N [-- ARGS]
    python slurm/steps.py wait --dir D --count N [--watch PID ...]     trainer overrides, one a line
    python slurm/steps.py latest-step DIR                              step of the latest checkpoint

Free-port strategy: every component picks a free port on its own node when it starts
(bind to port 0, then hand that port to the server) and publishes ``http://<host>:<port>``
as a file in the job's directory on the shared filesystem (``<dir>/servers/<host>-<task>.url``,
``<dir>/router.url``, written atomically). Nothing is guessed from the job id, so two jobs on
one node cannot collide, and the batch script learns every address from the files. Fixed
ports instead: ``SERVER_BASE_PORT`` (server ``i`` of a node listens on base + i) and
``ROUTER_PORT``.

Server commands come from :mod:`inference.launcher` (the same builders the in-process launcher
uses), from ``rollout.sglang`` as ``rollout.engine=sglang`` reads it (ServerConfig fields;
``extra_args`` passed through to the server).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def publish(path: str, url: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(url + "\n")
    os.replace(tmp, path)


def http_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = resp.read()
        return json.loads(body) if body.strip() else {}


def healthy(url: str) -> bool:
    from inference.launcher import http_ok

    return http_ok(url + "/health")


def _load(config: str, overrides: list[str]):
    from pipeline.config import load_job_config

    return load_job_config(config, overrides)


def cmd_config(args) -> int:
    """Validate for the trainer's world size; print the run's paths as shell assignments."""
    from pipeline.config import validate
    from pipeline.config_io import ConfigError

    try:
        cfg = _load(args.config, args.overrides)
        validate(cfg, args.world)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(cfg.logging.run_dir)
    ckpt = os.path.abspath(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"))
    model = cfg.model.hf_config if isinstance(cfg.model.hf_config, str) else ""
    sglang_tp = cfg.rollout.sglang.get("tp_size", "")
    kind = cfg.rollout.sglang.get("kind", "sglang")
    for name, value in (("RUN_DIR", run_dir), ("CKPT_DIR", ckpt), ("TOTAL_STEPS", cfg.trainer.steps),
                        ("CONFIG_ENGINE", cfg.rollout.engine), ("CONFIG_MODEL_PATH", model),
                        ("CONFIG_SGLANG_TP", sglang_tp), ("CONFIG_SERVER_KIND", kind)):
        print(f"{name}={shlex.quote(str(value))}")
    return 0


def server_command(cfg, kind: str, layout: str, model_path: str, port: int, index: int,
                   extra: list[str]) -> list[str]:
    """The launch command of rollout server ``index`` on this node (SGLang or the stand-in).

    ``rollout.sglang`` holds :class:`inference.launcher.ServerConfig` fields, as for
    ``rollout.engine=sglang``; its ``extra_args`` are the server's own options, kept only when
    the server kind is the config's (SGLang options mean nothing to the stand-in)."""
    from inference.launcher import ServerConfig, sglang_server_command, stand_in_command
    from pipeline.config_io import ConfigError
    from pipeline.engines import check_fields

    try:
        check_fields(cfg.rollout.sglang, ServerConfig, "rollout.sglang", exclude=("model_path",))
    except ConfigError as e:
        raise SystemExit(f"server: {e}") from None
    opts = dict(cfg.rollout.sglang)
    own = list(opts.pop("extra_args", ())) if opts.get("kind", "sglang") == kind else []
    for key in ("model_path", "kind", "layout", "host", "base_port", "num_servers", "router_args",
                "use_router", "router_port", "log_dir", "python", "extra_args"):
        opts.pop(key, None)
    if kind == "stand-in":
        opts.setdefault("stand_in_threads", int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        opts.setdefault("stand_in_max_batch_size", cfg.rollout.batch_size)
    # SGLang pins its own CUDA torch: it may live in another environment.
    python = os.environ.get("SGLANG_PYTHON", sys.executable) if kind == "sglang" else sys.executable
    server = ServerConfig(model_path=model_path, kind=kind, layout=layout, host="0.0.0.0",
                          extra_args=tuple(map(str, own + extra)), python=python, **opts)
    build = sglang_server_command if kind == "sglang" else stand_in_command
    return build(server, index, port)


def cmd_server(args) -> int:
    cfg = _load(args.config, args.overrides)
    model_path = os.environ.get("MODEL_PATH") or cfg.model.hf_config
    if not isinstance(model_path, str) or not model_path:
        print("server: model.hf_config is not a directory (an inline config); set MODEL_PATH to "
              "the model directory the rollout servers load", file=sys.stderr)
        return 2
    index = int(os.environ.get("SLURM_LOCALID", "0"))
    host = socket.gethostname()
    base = os.environ.get("SERVER_BASE_PORT")
    port = int(base) + index if base else free_port()
    cmd = server_command(cfg, args.kind, args.layout, model_path, port, index, args.extra)
    print(f"server {index} on {host}:{port}: {shlex.join(cmd)}", flush=True)
    publish(os.path.join(args.dir, "servers", f"{host}-{index}.url"), f"http://{host}:{port}")
    os.execv(cmd[0], cmd)


def _server_urls(directory: str) -> list[str]:
    d = os.path.join(directory, "servers")
    if not os.path.isdir(d):
        return []
    return sorted(open(os.path.join(d, n)).read().strip() for n in os.listdir(d) if n.endswith(".url"))


def _wait_servers(directory: str, count: int, deadline: float, watch: list[int]) -> list[str]:
    while True:
        urls = _server_urls(directory)
        if len(urls) >= count and all(healthy(u) for u in urls):
            return urls
        _check_deadline(deadline, watch, f"{len(urls)} of {count} rollout servers published and "
                                         f"healthy ({', '.join(urls) or 'none yet'})")
        time.sleep(1.0)


def _check_deadline(deadline: float, watch: list[int], what: str) -> None:
    for pid in watch:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"wait: the step with pid {pid} exited while waiting: {what}; "
                             "see its log in the job's log directory")
    if time.monotonic() > deadline:
        raise SystemExit(f"wait: timed out: {what}")


def cmd_router(args) -> int:
    from inference.launcher import ServerConfig, router_command

    deadline = time.monotonic() + args.timeout
    urls = _wait_servers(args.dir, args.count, deadline, [])
    port = int(os.environ.get("ROUTER_PORT") or free_port())
    cmd = router_command(ServerConfig(model_path="", host="0.0.0.0", python=sys.executable), urls, port)
    cmd += args.extra
    host = socket.gethostname()
    print(f"router on {host}:{port}: {shlex.join(cmd)}", flush=True)
    publish(os.path.join(args.dir, "router.url"), f"http://{host}:{port}")
    os.execv(cmd[0], cmd)


def cmd_wait(args) -> int:
    """Block until the servers and the router answer, then print the trainer's overrides."""
    deadline = time.monotonic() + args.timeout
    urls = _wait_servers(args.dir, args.count, deadline, args.watch)
    router_file = os.path.join(args.dir, "router.url")
    router = None
    while router is None:
        if os.path.exists(router_file):
            url = open(router_file).read().strip()
            if healthy(url) and _router_has_workers(url, len(urls)):
                router = url
                break
        _check_deadline(deadline, args.watch, "the router published and healthy with every worker")
        time.sleep(1.0)
    print("rollout.engine=http")
    print("rollout.urls=" + json.dumps(urls))
    print("rollout.router_url=" + router)
    return 0


def _router_has_workers(url: str, count: int) -> bool:
    """sglang-router answers /health before it has registered its workers."""
    try:
        workers = http_json(url + "/workers").get("workers", [])
    except urllib.error.HTTPError:
        return True  # a router without /workers: its /health is all there is
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return sum(1 for w in workers if w.get("is_healthy", True)) >= count


def cmd_latest_step(args) -> int:
    from megatron_ext.checkpoint import latest_checkpoint

    path = latest_checkpoint(args.dir)
    print(int(os.path.basename(path).split("_")[-1]) if path else 0)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="slurm/steps.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("--config", required=True)
    c.add_argument("--world", type=int, required=True)
    c.add_argument("overrides", nargs="*")
    sub.add_parser("port")
    s = sub.add_parser("server")
    s.add_argument("--config", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--kind", choices=["sglang", "stand-in"], required=True)
    s.add_argument("--layout", choices=["colocated", "disaggregated"], required=True)
    s.add_argument("overrides", nargs="*")
    r = sub.add_parser("router")
    r.add_argument("--dir", required=True)
    r.add_argument("--count", type=int, required=True)
    r.add_argument("--timeout", type=float, default=1800)
    w = sub.add_parser("wait")
    w.add_argument("--dir", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--timeout", type=float, default=1800)
    w.add_argument("--watch", type=int, nargs="*", default=[])
    lt = sub.add_parser("latest-step")
    lt.add_argument("dir")
    args = ap.parse_args(argv)
    args.extra = extra
    if args.cmd == "port":
        print(free_port())
        return 0
    return {"config": cmd_config, "server": cmd_server, "router": cmd_router, "wait": cmd_wait,
            "latest-step": cmd_latest_step}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
