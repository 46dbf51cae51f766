"""Rollout engines behind one interface (:mod:`inference.engine`).

- :mod:`inference.embedded`: transformers in process (the CPU default).
- :mod:`inference.sglang_engine`: SGLang servers over HTTP (launcher, router, client, weight sync).
- :mod:`inference.serve`: ``groupwise serve``, the embedded engine behind SGLang's HTTP protocol.

Nothing is imported here, so ``import inference`` stays cheap; import the module you use.
This package never imports ``pipeline`` or ``megatron_ext``: weights arrive as a plain
iterator of ``(hf_name, tensor)`` (:mod:`inference.weight_stream`).
"""
