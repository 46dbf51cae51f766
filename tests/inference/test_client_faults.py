"""The SGLang client against workers that misbehave on purpose: limits, timeouts, retries,
dead servers, shutdown, and the order of weight-update calls."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from inference.engine import EngineClosedError, SamplingParams
from inference.protocol import STAND_IN_TENSOR_FORMAT, decode_bucket_safetensors
from inference.server_handle import ServerDiedError, ServerHandle
from inference.sglang_client import ClientConfig, RolloutRequestError
from inference.sglang_engine import SGLangEngine
from inference.launcher import ServerConfig, router_available, router_command, wait_healthy
from inference.weight_sync import WeightSyncConfig
from tests.inference.fake_worker import FakeWorker, free_port

FAST = ClientConfig(request_timeout_s=5, max_retries=2, backoff_s=0.01, backoff_max_s=0.05, health_timeout_s=1)
SP = SamplingParams(max_new_tokens=3, seed=0)


@pytest.fixture
def workers():
    made = [FakeWorker("w0"), FakeWorker("w1")]
    yield made
    for w in made:
        w.stop()


def _engine(workers, config=FAST, **kwargs) -> SGLangEngine:
    return SGLangEngine([ServerHandle(w.url, w.name) for w in workers], None, client=config, **kwargs)


def test_concurrency_limit_holds(workers):
    worker = workers[0]
    worker.faults.sleep_s = 0.05
    cfg = ClientConfig(max_concurrency=4, request_timeout_s=10)
    with _engine([worker], cfg) as engine:
        groups = engine.generate([[1], [2], [3], [4], [5]], 8, SP)
    assert sum(len(g) for g in groups) == 40 and worker.generate_calls == 40
    assert worker.peak == 4


def test_timeouts_are_retried_then_reported_naming_the_server(workers):
    worker = workers[0]
    worker.faults.sleep_s = 3.0
    cfg = ClientConfig(request_timeout_s=0.2, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with _engine([worker], cfg) as engine, pytest.raises(RolloutRequestError, match=r"failed 3 times; last on w0 .*TimeoutError"):
        engine.generate([[1]], 1, SP)
    assert worker.generate_calls == 3
    assert time.monotonic() - start < 3.0


def test_http_500s_are_retried_and_then_succeed(workers):
    workers[0].faults.fail = 2
    with _engine(workers[:1]) as engine:
        [[c]] = engine.generate([[10]], 1, SP)
    assert c.token_ids == [11, 12, 13] and workers[0].generate_calls == 3
    assert engine.client.stats["retries"] == 2


def test_persistent_http_500s_are_reported_with_the_server_message(workers):
    workers[0].faults.fail = 100
    with _engine(workers[:1]) as engine, pytest.raises(RolloutRequestError, match="HTTP 500: w0: internal error"):
        engine.generate([[10]], 1, SP)
    assert workers[0].generate_calls == FAST.max_retries + 1


def test_a_connection_dropped_mid_request_is_retried(workers):
    workers[0].faults.drop = 1
    with _engine(workers[:1]) as engine:
        [[c]] = engine.generate([[20]], 1, SP)
    assert c.token_ids == [21, 22, 23] and workers[0].generate_calls == 2


def test_a_refused_request_is_not_retried(workers):
    workers[0].faults.reject = True
    with _engine(workers[:1]) as engine, pytest.raises(RolloutRequestError, match="w0.*HTTP 400.*bad request"):
        engine.generate([[1]], 1, SP)
    assert workers[0].generate_calls == 1


def test_aborted_completions_are_sent_again(workers):
    workers[0].faults.abort = 2
    with _engine(workers[:1]) as engine:
        [[c]] = engine.generate([[1]], 1, SP)
    assert c.finish_reason == "length" and engine.client.stats["abort_resends"] == 2


def test_round_robin_spreads_requests_without_a_router(workers):
    with _engine(workers) as engine:
        engine.generate([[1]] * 10, 1, SP)
    assert workers[0].generate_calls == workers[1].generate_calls == 5


def _spawn_fake(name: str, log_dir: Path) -> ServerHandle:
    port = free_port()
    log = log_dir / f"{name}.log"
    root = Path(__file__).resolve().parents[2]
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tests.inference.fake_worker", "--port", str(port), "--name", name],
                                stdout=f, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    return ServerHandle(f"http://127.0.0.1:{port}", name, proc, log)


def test_a_killed_worker_is_detected_and_its_requests_go_elsewhere(tmp_path):
    handles = [_spawn_fake("victim", tmp_path), _spawn_fake("survivor", tmp_path)]
    try:
        wait_healthy(handles, timeout_s=30)
        with SGLangEngine(handles, None, client=FAST) as engine:
            assert len(engine.generate([[1]] * 4, 1, SP)) == 4
            handles[0].process.kill()
            handles[0].process.wait()
            groups = engine.generate([[1]] * 10, 2, SP)
            assert all(c.token_ids == [2, 3, 4] for g in groups for c in g)
            assert engine.client.stats["dead_servers"] == 1
            assert [w.name for w in engine.client.live_workers] == ["survivor"]

            handles[1].process.kill()
            handles[1].process.wait()
            with pytest.raises(ServerDiedError) as err:
                engine.generate([[1]], 1, SP)
            message = str(err.value)
            assert "survivor" in message and "exited with code -9" in message
            assert '"fake worker": "survivor"' in message  # its last log lines are quoted
    finally:
        for h in handles:
            if h.process.poll() is None:
                h.process.kill()


@pytest.mark.skipif(not router_available(), reason="sglang-router is not installed (test extra)")
def test_a_killed_worker_behind_the_router_is_routed_around_then_reported(tmp_path):
    handles = [_spawn_fake("victim", tmp_path), _spawn_fake("survivor", tmp_path)]
    cfg = ServerConfig(model_path="unused", router_args=("--log-level", "warn"))
    router = None
    try:
        wait_healthy(handles, timeout_s=30)
        port = free_port()
        router = subprocess.Popen(router_command(cfg, [h.url for h in handles], port),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_healthy([ServerHandle(f"http://127.0.0.1:{port}", "router", router)], timeout_s=30)
        with SGLangEngine(handles, f"http://127.0.0.1:{port}", client=FAST) as engine:
            handles[0].process.kill()
            handles[0].process.wait()
            groups = engine.generate([[1]] * 8, 2, SP)
            assert all(c.token_ids == [2, 3, 4] for g in groups for c in g)
            assert engine.client.stats["dead_servers"] == 1
            assert [w.name for w in engine.client.live_workers] == ["survivor"]
            handles[1].process.kill()
            handles[1].process.wait()
            with pytest.raises(ServerDiedError, match="(?s)victim.*exited with code -9.*survivor.*exited with code -9"):
                engine.generate([[1]], 1, SP)
    finally:
        for h in handles:
            if h.process.poll() is None:
                h.process.kill()
        if router is not None:
            os.killpg(router.pid, 9)
            router.wait()


def test_close_aborts_in_flight_generation_cleanly(workers):
    worker = workers[0]
    worker.faults.sleep_s = 30.0
    engine = _engine([worker], ClientConfig(request_timeout_s=60))
    outcome: list[BaseException] = []

    def rollout():
        try:
            engine.generate([[1]] * 3, 2, SP)
        except BaseException as err:  # the thread reports what generate raised
            outcome.append(err)

    thread = threading.Thread(target=rollout)
    thread.start()
    while worker.generate_calls < 6:
        time.sleep(0.01)
    start = time.monotonic()
    engine.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - start < 5
    assert len(outcome) == 1 and isinstance(outcome[0], EngineClosedError)
    assert ("/abort_request", {"abort_all": True}) in worker.calls
    with pytest.raises(EngineClosedError):
        engine.generate([[1]], 1, SP)


def _stream():
    """Three buckets of (name, tensor), the last one the final bucket of the update."""
    return [[("a", torch.full((2,), 1.0))], [("b", torch.full((3,), 2.0))], [("c", torch.full((1,), 3.0))]]


def test_weight_update_calls_arrive_in_order_with_pause_flush_and_resume(workers):
    sync = WeightSyncConfig(tensor_format="safetensors", pause_mode="abort")
    with _engine(workers, weight_sync=sync) as engine:
        assert engine.update_weights(iter(_stream()), version=4) == 4
    for worker in workers:
        assert worker.paths() == [
            "/pause_generation", "/flush_cache", "/update_weights_from_tensor", "/update_weights_from_tensor",
            "/update_weights_from_tensor", "/continue_generation", "/abort_request",
        ]
        updates = [body for path, body in worker.calls if path == "/update_weights_from_tensor"]
        assert [u["weight_version"] for u in updates] == [None, None, "4"]
        assert [u["flush_cache"] for u in updates] == [False, False, True]
        assert {u["load_format"] for u in updates} == {STAND_IN_TENSOR_FORMAT}
        received = [decode_bucket_safetensors(u["serialized_named_tensors"][0]) for u in updates]
        assert [[(n, t.tolist()) for n, t in b] for b in received] == [[(n, t.tolist()) for n, t in b] for b in _stream()]
        assert ("/pause_generation", {"mode": "abort"}) in worker.calls


def test_a_failed_update_leaves_servers_paused_and_generation_refused(workers):
    workers[1].faults.fail_paths["/update_weights_from_tensor"] = 400
    with _engine(workers, weight_sync=WeightSyncConfig(tensor_format="safetensors")) as engine:
        with pytest.raises(RolloutRequestError, match=r"w1 .*/update_weights_from_tensor answered HTTP 400.*refused by w1"):
            engine.update_weights(iter(_stream()), version=1)
        assert "/continue_generation" not in workers[0].paths()
        assert engine.weight_version == 0
        with pytest.raises(RuntimeError, match="partially updated"):
            engine.generate([[1]], 1, SP)
        workers[1].faults.fail_paths.clear()
        assert engine.update_weights(iter(_stream()), version=2) == 2
        assert engine.generate([[1]], 1, SP)[0][0].token_ids == [2, 3, 4]


def test_a_failed_pause_resumes_the_other_servers(workers):
    workers[0].faults.fail_paths["/pause_generation"] = 500
    with _engine(workers, weight_sync=WeightSyncConfig(tensor_format="safetensors")) as engine:
        with pytest.raises(RolloutRequestError, match="w0.*pause_generation"):
            engine.update_weights(iter(_stream()))
        assert "/continue_generation" in workers[1].paths()
        assert "/update_weights_from_tensor" not in workers[1].paths()
        assert engine.generate([[1]], 1, SP)[0][0].token_ids == [2, 3, 4]
