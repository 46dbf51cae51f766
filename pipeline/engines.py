"""Build this replica's rollout engine from the config (called on model-parallel leaders).

``embedded``: transformers in this process. ``sglang``: launch servers (real SGLang, or with
``rollout.sglang.kind: stand-in`` the CPU stand-in ``groupwise serve``) plus sglang-router;
every other ``rollout.sglang`` key is a field of :class:`inference.launcher.ServerConfig`.
``http``: connect to servers started elsewhere (Slurm steps) at ``rollout.urls``, behind
``rollout.router_url`` when given.

Weights reach the servers by ``rollout.weight_sync`` (fields of
:class:`inference.weight_sync.WeightSyncConfig`; transport ``tensor``, ``distributed`` or
``disk``). With ``http`` and data-parallel size ``dp`` > 1, DP leader ``i`` owns share ``i`` of
``rollout.urls`` (``len(urls) / dp`` consecutive servers): it pauses, updates and resumes only
those, so every server takes each sync exactly once. Without a router it also generates on
them alone. With a router (shared by all leaders, which route to every server), the trainer
waits for every leader's update before anyone generates again (``Trainer.sync_weights``), so
no request lands on a server that still holds the previous weights.

AAPO's reference engine never receives updates: with ``http`` it runs on its own servers,
``rollout.ref_urls`` (shared out the same way, no router); with ``sglang`` it launches its own.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config_io import ConfigError


def check_fields(options: dict, cls, where: str, exclude: tuple[str, ...] = ()) -> None:
    """Every key of the passthrough section ``where`` is a field of dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a {cls.__name__} field; known: "
                          f"{', '.join(sorted(known))}")


def server_config(cfg, model_path: str):
    """``rollout.sglang`` as the :class:`~inference.launcher.ServerConfig` that launches the
    servers of ``model_path`` (``kind`` defaults to real SGLang)."""
    from inference.launcher import ServerConfig

    opts = dict(cfg.rollout.sglang)
    check_fields(opts, ServerConfig, "rollout.sglang", exclude=("model_path",))
    opts.setdefault("kind", "sglang")
    for key in ("extra_args", "router_args"):
        if key in opts:
            opts[key] = tuple(opts[key])
    try:
        return ServerConfig(model_path=model_path, **opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rollout.sglang: {e}") from None


def weight_sync_config(cfg, dp_rank: int = 0, dp: int = 1):
    """``rollout.weight_sync`` as DP leader ``dp_rank``'s
    :class:`~inference.weight_sync.WeightSyncConfig`. Leaders must not collide: with ``disk``
    each writes under ``disk_dir/dp<rank>``; with ``distributed`` and a fixed ``master_port``
    each listens on ``master_port + dp_rank``."""
    from inference.weight_sync import WeightSyncConfig

    opts = dict(cfg.rollout.weight_sync)
    check_fields(opts, WeightSyncConfig, "rollout.weight_sync")
    transport = opts.get("transport", "tensor")
    if transport not in ("tensor", "distributed", "disk"):
        raise ConfigError(f"rollout.weight_sync.transport={transport!r}: expected tensor "
                          "(colocated), distributed (NCCL broadcast to other nodes) or disk")
    if transport == "disk":
        if not opts.get("disk_dir"):
            raise ConfigError("rollout.weight_sync.transport=disk needs rollout.weight_sync.disk_dir: "
                              "a directory the trainer writes and every server reads")
        if dp > 1:
            opts["disk_dir"] = os.path.join(opts["disk_dir"], f"dp{dp_rank}")
    if transport == "distributed" and opts.get("master_port") is not None and dp > 1:
        opts["master_port"] = int(opts["master_port"]) + dp_rank
    try:
        return WeightSyncConfig(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"rollout.weight_sync: {e}") from None


def url_share(urls: list[str], dp_rank: int, dp: int) -> list[str]:
    """DP leader ``dp_rank``'s servers: share ``dp_rank`` of ``dp`` equal consecutive shares
    (``validate`` requires ``len(urls)`` to be a multiple of ``dp``)."""
    per = len(urls) // dp
    return list(urls[dp_rank * per:(dp_rank + 1) * per])


def build_engine(cfg, hf_path: str, *, dp_rank: int = 0, dp: int = 1, reference: bool = False):
    """The rollout engine of DP leader ``dp_rank`` of ``dp``; ``reference``: AAPO's frozen
    reference engine (never updated)."""
    r = cfg.rollout
    if r.engine == "embedded":
        from inference.embedded import EmbeddedEngine

        dtype = "bfloat16" if cfg.model.params_dtype == "bf16" else "float32"
        return EmbeddedEngine.from_pretrained(hf_path, dtype=dtype, max_batch_size=r.batch_size)
    from inference.sglang_engine import SGLangEngine

    if r.engine == "http":
        if reference:
            if not r.ref_urls:
                raise ConfigError("algorithm aapo with rollout.engine=http needs rollout.ref_urls")
            return SGLangEngine.connect(url_share(r.ref_urls, dp_rank, dp))
        return SGLangEngine.connect(url_share(r.urls, dp_rank, dp), r.router_url,
                                    weight_sync=weight_sync_config(cfg, dp_rank, dp))
    if r.engine == "sglang":
        sync = None if reference else weight_sync_config(cfg, dp_rank, dp)
        return SGLangEngine.launch(server_config(cfg, hf_path), weight_sync=sync)
    raise ConfigError(f"rollout.engine={r.engine!r}: expected embedded, sglang or http")
