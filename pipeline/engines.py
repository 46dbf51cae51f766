"""Build this replica's rollout engine from the config (called on model-parallel leaders)."""

from __future__ import annotations


def build_engine(cfg, hf_path: str):
    r = cfg.rollout
    if r.engine == "embedded":
        from inference.embedded import EmbeddedEngine

        dtype = "bfloat16" if cfg.model.params_dtype == "bf16" else "float32"
        return EmbeddedEngine.from_pretrained(hf_path, dtype=dtype, max_batch_size=r.batch_size)
    if r.engine == "http":
        from inference.sglang_engine import SGLangEngine

        return SGLangEngine.connect(list(r.urls), **r.sglang)
    if r.engine == "sglang":
        from inference.sglang_engine import SGLangEngine

        return SGLangEngine.launch(hf_path, **r.sglang)
    raise ValueError(f"rollout.engine={r.engine!r}: expected embedded, sglang or http")
