"""Build this replica's rollout engine from the config (called on model-parallel leaders).

``embedded``: transformers in this process. ``sglang``: launch servers (real SGLang, or with
``rollout.sglang.kind: stand-in`` the CPU stand-in ``groupwise serve``) plus sglang-router;
every other ``rollout.sglang`` key is a field of :class:`inference.launcher.ServerConfig`.
``http``: connect to servers started elsewhere (Slurm steps) at ``rollout.urls``, behind
``rollout.router_url`` when given.
"""

from __future__ import annotations

import dataclasses

from pipeline.config_io import ConfigError


def build_engine(cfg, hf_path: str):
    r = cfg.rollout
    if r.engine == "embedded":
        from inference.embedded import EmbeddedEngine

        dtype = "bfloat16" if cfg.model.params_dtype == "bf16" else "float32"
        return EmbeddedEngine.from_pretrained(hf_path, dtype=dtype, max_batch_size=r.batch_size)
    from inference.sglang_engine import SGLangEngine

    if r.engine == "http":
        return SGLangEngine.connect(list(r.urls), r.router_url)
    if r.engine == "sglang":
        from inference.launcher import ServerConfig

        known = {f.name for f in dataclasses.fields(ServerConfig)} - {"model_path"}
        opts = dict(r.sglang)
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ConfigError(f"rollout.sglang.{unknown[0]} is not a server option; known: "
                              f"{', '.join(sorted(known))}")
        opts.setdefault("kind", "sglang")
        for key in ("extra_args", "router_args"):
            if key in opts:
                opts[key] = tuple(opts[key])
        try:
            server = ServerConfig(model_path=hf_path, **opts)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"rollout.sglang: {e}") from None
        return SGLangEngine.launch(server)
    raise ConfigError(f"rollout.engine={r.engine!r}: expected embedded, sglang or http")
