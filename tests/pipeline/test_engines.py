"""Rollout engines from the config: passthrough sections checked before launch with the
messages the engine builder gives, the weight-sync transport plumbed through, and with
engine=http and DP > 1 every server updated by exactly one DP leader."""

import os

import pytest
import torch

from pipeline.config import load_job_config, validate
from pipeline.config_io import ConfigError
from pipeline.engines import build_engine, server_config, url_share
from tests.inference.fake_worker import FakeWorker

TINY = "examples/tiny/grpo.yaml"  # TP 1: the world size is the data-parallel size


@pytest.fixture(scope="module", autouse=True)
def assets():
    from examples.tiny.make_assets import build

    build()


@pytest.fixture
def workers():
    made = [FakeWorker(f"w{i}") for i in range(4)]
    yield made
    for w in made:
        w.stop()


def _http(urls, *more):
    return load_job_config(TINY, ["rollout.engine=http", f"rollout.urls=[{', '.join(urls)}]", *more])


def _stream():
    return iter([("model.embed_tokens.weight", torch.ones(4, 2)), ("lm_head.weight", torch.zeros(4, 2))])


def _updates(worker, path="/update_weights_from_tensor"):
    return sum(1 for p, _ in worker.calls if p == path)


# ------------------------------------------------------------------ rollout.sglang


def test_unknown_sglang_key_is_refused_by_validate_with_the_builders_message():
    cfg = load_job_config(TINY, ["rollout.engine=sglang", "rollout.sglang={tp: 2}"])
    with pytest.raises(ConfigError) as at_validate:
        validate(cfg, 1)
    with pytest.raises(ConfigError) as at_launch:
        server_config(cfg, "/models/x")
    assert str(at_validate.value) == str(at_launch.value)
    assert str(at_validate.value).startswith("rollout.sglang.tp is not a ServerConfig field; known: ")


def test_unknown_sglang_key_is_refused_for_http_too():
    """engine=http servers are launched from rollout.sglang by the Slurm steps."""
    with pytest.raises(ConfigError, match="rollout.sglang.mem_fraction is not a ServerConfig field"):
        validate(_http(["http://a:1"], "rollout.sglang={mem_fraction: 0.5}"), 1)


def test_bad_sglang_value_is_refused_before_launch():
    cfg = load_job_config(TINY, ["rollout.engine=sglang", "rollout.sglang={mem_fraction_static: 1.5}"])
    with pytest.raises(ConfigError, match=r"rollout.sglang: .*mem_fraction_static must be in \(0, 1\)"):
        validate(cfg, 1)


# ------------------------------------------------------------------ rollout.weight_sync


@pytest.mark.parametrize("value, message", [
    ("{transport: nccl}", "rollout.weight_sync.transport='nccl': expected tensor"),
    ("{transport: disk}", "rollout.weight_sync.transport=disk needs rollout.weight_sync.disk_dir"),
    ("{dir: /x}", "rollout.weight_sync.dir is not a WeightSyncConfig field"),
    ("{pause_mode: stop}", "rollout.weight_sync: WeightSyncConfig.pause_mode must be abort"),
])
def test_bad_weight_sync_is_named(value, message):
    with pytest.raises(ConfigError, match=message):
        validate(_http(["http://a:1"], f"rollout.weight_sync={value}"), 1)


def test_embedded_engine_rejects_a_weight_sync_section():
    cfg = load_job_config(TINY, ["rollout.weight_sync={transport: disk, disk_dir: /x}"])
    with pytest.raises(ConfigError, match="the embedded engine loads them in process: remove "
                                          "rollout.weight_sync"):
        validate(cfg, 1)


def test_default_transport_is_tensor(workers):
    engine = build_engine(_http([workers[0].url]), "unused")
    try:
        assert engine._sync.config.transport == "tensor"
    finally:
        engine.close()


def test_disk_transport_reaches_the_engine_with_a_directory_per_dp_leader(workers, tmp_path):
    """DP 2, 4 servers: leader 1 writes under disk_dir/dp1 and its two servers load from there."""
    cfg = _http([w.url for w in workers], f"rollout.weight_sync={{transport: disk, disk_dir: {tmp_path}}}")
    engine = build_engine(cfg, "unused", dp_rank=1, dp=2)
    try:
        assert engine.update_weights(_stream(), version=1) == 1
    finally:
        engine.close()
    assert os.listdir(tmp_path) == ["dp1"]
    loads = [[b for p, b in w.calls if p == "/update_weights_from_disk"] for w in workers]
    assert [len(x) for x in loads] == [0, 0, 1, 1]
    assert loads[2][0]["model_path"] == str(tmp_path / "dp1")


def test_fixed_distributed_master_port_is_offset_per_dp_leader(workers):
    from pipeline.engines import weight_sync_config

    cfg = _http([w.url for w in workers], "rollout.weight_sync={transport: distributed, master_port: 29600}")
    assert [weight_sync_config(cfg, r, 2).master_port for r in (0, 1)] == [29600, 29601]


# ------------------------------------------------------------------ DP shares of rollout.urls


def test_urls_are_split_into_equal_consecutive_shares():
    urls = ["u0", "u1", "u2", "u3", "u4", "u5"]
    assert [url_share(urls, r, 3) for r in range(3)] == [["u0", "u1"], ["u2", "u3"], ["u4", "u5"]]


def test_urls_must_be_a_multiple_of_the_data_parallel_size():
    cfg = _http(["http://a:1", "http://b:1", "http://c:1"], "rollout.prompts_per_step=48")
    with pytest.raises(ConfigError, match="rollout.urls has 3 server.s., not a multiple of the "
                                          "data-parallel size 2"):
        validate(cfg, 2)
    assert validate(cfg, 3)["dp"] == 3  # one server per leader
    assert validate(cfg, 1)["dp"] == 1  # one leader drives all three


def test_every_server_is_updated_exactly_once_per_sync(workers):
    """DP 2 over 4 servers: leader 0 pushes to servers 0-1, leader 1 to servers 2-3."""
    cfg = _http([w.url for w in workers])
    engines = [build_engine(cfg, "unused", dp_rank=r, dp=2) for r in (0, 1)]
    try:
        assert [[w.url for w in e.workers] for e in engines] == [
            [workers[0].url, workers[1].url], [workers[2].url, workers[3].url]]
        for e in engines:
            e.update_weights(_stream(), version=1)
    finally:
        for e in engines:
            e.close()
    assert [_updates(w) for w in workers] == [1, 1, 1, 1]
    assert [_updates(w, "/pause_generation") for w in workers] == [1, 1, 1, 1]


# ------------------------------------------------------------------ AAPO's reference servers


def test_aapo_over_http_needs_its_own_reference_servers():
    with pytest.raises(ConfigError, match="algorithm aapo with rollout.engine=http needs rollout.ref_urls"):
        validate(_http(["http://a:1"], "algorithm={name: aapo}"), 1)


def test_reference_servers_must_not_be_policy_servers():
    cfg = _http(["http://a:1", "http://b:1"], "algorithm={name: aapo}", "rollout.ref_urls=[http://b:1]")
    with pytest.raises(ConfigError, match="rollout.ref_urls and rollout.urls share http://b:1"):
        validate(cfg, 1)


def test_reference_urls_without_aapo_are_refused():
    with pytest.raises(ConfigError, match=r"rollout.ref_urls names the reference servers of algorithm "
                                          r"aapo .*\(here: grpo, engine=http\)"):
        validate(_http(["http://a:1"], "rollout.ref_urls=[http://r:1]"), 1)


def test_reference_engine_runs_on_its_share_of_ref_urls(workers):
    policy, ref = [w.url for w in workers[:2]], [w.url for w in workers[2:]]
    cfg = _http(policy, "algorithm={name: aapo}", f"rollout.ref_urls=[{', '.join(ref)}]",
                "rollout.router_url=http://router:1")
    assert validate(cfg, 2)["dp"] == 2
    engine = build_engine(cfg, "unused", dp_rank=1, dp=2, reference=True)
    try:
        assert [w.url for w in engine.workers] == [workers[3].url]
        assert engine.client.router_url is None  # the policy's router fronts the policy servers
    finally:
        engine.close()


@pytest.mark.parametrize("router, dp, waits", [("http://router:1", 2, True), (None, 2, False),
                                               ("http://router:1", 1, False)])
def test_leaders_behind_one_router_wait_for_every_share_after_a_sync(monkeypatch, router, dp, waits):
    """The router sends any leader's requests to any server, so no leader may generate before
    every leader updated its share; without a router each leader generates on its own share."""
    from types import SimpleNamespace

    import megatron_ext.export
    from pipeline import trainer

    cfg = _http(["http://a:1", "http://b:1"], f"rollout.router_url={router or 'null'}")
    pushed, barriers = [], []
    monkeypatch.setattr(megatron_ext.export, "export_hf_weights", lambda model, **kw: iter(["bucket"]))
    monkeypatch.setattr(trainer.dist, "barrier", lambda group=None: barriers.append(group))
    engine = SimpleNamespace(update_weights=lambda stream, version: pushed.append((list(stream), version)))
    fake = SimpleNamespace(cfg=cfg, weight_version=3, model=None, hf=None, engine=engine,
                           topo=SimpleNamespace(leader=True, dp=dp, dp_group="dp-group"))
    trainer.Trainer.sync_weights(fake)
    assert pushed == [(["bucket"], 4)]
    assert barriers == (["dp-group"] if waits else [])
