"""Launcher: command lines per layout (checked against the real parsers when importable),
and launch failures that name the server and quote its log."""

from __future__ import annotations

import argparse
import importlib.util
import stat
import textwrap

import pytest

from inference.launcher import Launcher, ServerConfig, router_command, sglang_server_command, stand_in_command
from inference.serve import parse_args as stand_in_parse_args
from inference.server_handle import ServerDiedError

COLOCATED = ServerConfig(
    model_path="/models/qwen2.5-7b", kind="sglang", layout="colocated", num_servers=4, tp_size=2,
    mem_fraction_static=0.6, dtype="bfloat16", host="0.0.0.0", base_gpu_id=0,
    extra_args=("--chunked-prefill-size", "4096", "--disable-radix-cache"),
)
DISAGGREGATED = ServerConfig(
    model_path="/models/llama-3-70b", kind="sglang", layout="disaggregated", tp_size=8, mem_fraction_static=0.85,
)


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_colocated_servers_get_memory_saver_and_their_own_gpus():
    cmds = [sglang_server_command(COLOCATED, i, 30000 + i) for i in range(4)]
    assert [_flag(c, "--base-gpu-id") for c in cmds] == ["0", "2", "4", "6"]
    for i, cmd in enumerate(cmds):
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        assert _flag(cmd, "--model-path") == "/models/qwen2.5-7b" and _flag(cmd, "--tp-size") == "2"
        assert _flag(cmd, "--port") == str(30000 + i) and _flag(cmd, "--host") == "0.0.0.0"
        assert _flag(cmd, "--mem-fraction-static") == "0.6" and _flag(cmd, "--dtype") == "bfloat16"
        assert "--enable-memory-saver" in cmd and "--enable-weights-cpu-backup" in cmd
        assert "--enable-deterministic-inference" in cmd and _flag(cmd, "--weight-version") == "0"
        assert cmd[-3:] == ["--chunked-prefill-size", "4096", "--disable-radix-cache"]


def test_disaggregated_servers_do_not_use_the_memory_saver():
    cmd = sglang_server_command(DISAGGREGATED, 0, 30000)
    assert "--enable-memory-saver" not in cmd and "--enable-weights-cpu-backup" not in cmd
    assert _flag(cmd, "--tp-size") == "8" and "--dtype" not in cmd


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                    reason="sglang is not installed here (it pins a CUDA torch; it lives in the gpu extra)")
@pytest.mark.parametrize("cfg", [COLOCATED, DISAGGREGATED], ids=["colocated", "disaggregated"])
def test_sglang_accepts_the_command_lines(cfg):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(sglang_server_command(cfg, 1, 31000)[3:])
    assert args.model_path == cfg.model_path and args.tp_size == cfg.tp_size and args.port == 31000
    assert args.mem_fraction_static == cfg.mem_fraction_static
    assert args.enable_memory_saver == (cfg.layout == "colocated")


def test_the_stand_in_accepts_its_command_line():
    cfg = ServerConfig(model_path="/tmp/m", dtype="bfloat16", stand_in_threads=2, extra_args=("--log-level", "warning"))
    args = stand_in_parse_args(stand_in_command(cfg, 0, 31000)[3:])
    assert (args.model, args.port, args.dtype, args.num_threads, args.log_level) == ("/tmp/m", 31000, "bfloat16", 2, "warning")


@pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None, reason="sglang-router is not installed")
def test_sglang_router_accepts_its_command_line():
    from sglang_router.launch_router import parse_router_args

    cfg = ServerConfig(model_path="m", router_args=("--log-level", "warn"))
    args = parse_router_args(router_command(cfg, ["http://a:1", "http://b:2"], 30000)[3:])
    assert args.worker_urls == ["http://a:1", "http://b:2"] and args.policy == "round_robin" and args.port == 30000


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ServerConfig.layout"):
        ServerConfig(model_path="m", layout="shared")
    with pytest.raises(ValueError, match="ServerConfig.mem_fraction_static"):
        ServerConfig(model_path="m", mem_fraction_static=1.5)


def _fake_python(tmp_path, body: str):
    """An executable that stands in for the Python interpreter of the launched servers."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_server_that_exits_while_starting_fails_the_launch_with_its_log(tmp_path):
    python = _fake_python(tmp_path, """\
        echo "loading weights"
        echo "CUDA out of memory while loading layer 3" >&2
        exit 3
        """)
    cfg = ServerConfig(model_path="m", python=python, num_servers=2, use_router=False, log_dir=str(tmp_path / "logs"))
    with pytest.raises(ServerDiedError, match="(?s)stand-in-server-\\d at http://.* exited with code 3.*CUDA out of memory"):
        Launcher(cfg).start()


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path, monkeypatch):
    spawned = []
    spawn = Launcher._spawn
    monkeypatch.setattr(Launcher, "_spawn", lambda self, *args: spawned.append(spawn(self, *args)) or spawned[-1])
    python = _fake_python(tmp_path, """\
        echo "stuck compiling kernels"
        exec sleep 60
        """)
    launcher = Launcher(ServerConfig(model_path="m", python=python, use_router=False, health_timeout_s=1.0,
                                     log_dir=str(tmp_path / "logs")))
    with pytest.raises(TimeoutError, match="(?s)not healthy after 1s: stand-in-server-0.*stuck compiling kernels"):
        launcher.start()
    assert len(spawned) == 1 and spawned[0].process.poll() is not None  # stopped, not leaked
