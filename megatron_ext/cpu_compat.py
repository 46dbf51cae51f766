"""Run megatron-core without CUDA: the one place in groupwise that patches Megatron.

megatron-core 0.16.x is written for CUDA + NCCL. On a CPU machine (development, CI, a
newcomer's laptop) the same code runs over `gloo` once the CUDA assumptions below are
redirected. Every patch here was verified necessary by removing it (see
`shared/specs/megatron-on-cpu.md` for the measurements); each one lists the code path that
needs it. Nothing is patched when CUDA is available: `enable()` is a no-op there.

Patches (all installed by :func:`enable`, idempotent, process-wide):

1. ``torch.cuda.current_device()`` returns ``"cpu"``.
   Layers, DDP grad buffers and pipeline p2p buffers allocate with
   ``device=torch.cuda.current_device()``.
2. A ``TorchFunctionMode`` rewrites ``device="cuda"`` (and ``cuda:N``) to CPU in tensor
   factories and ``Tensor.to``. Every schedule in ``pipeline_parallel/schedules.py``
   creates its token counters with ``torch.zeros([], device="cuda")``, and the stock local
   attention builds its causal mask on ``"cuda"``. The mode measured zero overhead.
3. ``Tensor.cuda()`` returns the tensor itself, ``Tensor.pin_memory()`` is the identity.
   PP tied-embedding sync and optimizer-state reload call ``.cuda()``.
4. ``Tensor.type()`` with no argument reports the CUDA type string for CPU tensors
   (``'torch.cuda.FloatTensor'``). ``clip_grads.py`` asserts on it and both optimizers
   pick the fp32/bf16 path by comparing against it.
5. ``torch.cuda.synchronize()`` is a no-op (``dist_checkpointing`` save; p2p with batched
   communication).
6. CUDA RNG calls are routed to the CPU generator: ``torch.cuda.get_rng_state``,
   ``torch.cuda.manual_seed`` and Megatron's private ``_set_cuda_rng_state``, so
   ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork()`` (dropout under TP)
   work. Megatron warns on every fork that the CPU RNG changed inside the "GPU" context,
   which is exactly what routing means; that logger is quieted to errors.
7. ``torch.cuda.Stream`` / ``torch.cuda.current_stream`` / ``torch.cuda.stream`` become
   inert stand-ins, for DDP's ``overlap_grad_reduce`` communication stream.

Configuration that must accompany the patches (applied by :func:`cpu_model_config_overrides`
and asserted by :func:`check_config`):

- ``use_cpu_initialization=True``: builds the full master weight from the CPU seed on every
  rank, then slices it, so every TP/PP layout starts from identical weights.
- ``gradient_accumulation_fusion=False``: the fused wgrad accumulation is a CUDA extension.
- ``batch_p2p_comm=False``: with the default ``True``, the interleaved schedule over gloo
  hands micro-batches 2-3 the wrong tensors and the loss is silently wrong.
- ``pipeline_dtype`` set whenever PP > 1.

Sequence parallelism without TransformerEngine/Apex needs a norm whose parameters carry
``sequence_parallel=True`` (Megatron's ``WrappedTorchNorm`` refuses SP); that is a module in
the layer spec (:mod:`megatron_ext.layers`), not a patch.

Distributed-optimizer checkpoint bugs of 0.16.1 are worked around where checkpoints are
saved and loaded, see :func:`fix_shared_adam_step` here and the checkpoint module.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_enabled = False
_mode: "_CudaToCpuMode | None" = None

_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.as_tensor, torch.linspace, torch.eye,
    torch.empty_strided, torch.randperm, torch.tril, torch.triu,
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal in Megatron's calls
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` to CPU in factories and ``Tensor.to`` (patch 2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func in (torch.Tensor.to,) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, int))
                         else a for i, a in enumerate(args))
        if "pin_memory" in kwargs:
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: work is already ordered (patch 7)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stream_ctx(stream=None):
    return _InertStream()


_orig_type = torch.Tensor.type


def _cuda_type_string(self, dtype=None, non_blocking=False, **kwargs):
    """Patch 4: ``t.type()`` of a CPU tensor reads as its CUDA twin."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = _orig_type(self)
        # Under the TorchFunctionMode the original call re-enters this function through
        # __torch_function__, so the name may already carry the prefix.
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _orig_type(self, dtype, non_blocking, **kwargs)


def enable() -> bool:
    """Install the CPU patches if CUDA is absent. Returns True when they are active."""
    global _enabled, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _enabled:
            return True
        torch.cuda.current_device = lambda: "cpu"  # patch 1
        torch.Tensor.cuda = lambda self, *a, **k: self  # patch 3
        torch.Tensor.pin_memory = lambda self, *a, **k: self
        torch.Tensor.type = _cuda_type_string  # patch 4
        torch.cuda.synchronize = lambda *a, **k: None  # patch 5
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # patch 6
        torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
        torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
        torch.cuda.random.manual_seed = torch.cuda.manual_seed
        torch.cuda.Stream = _InertStream  # patch 7
        torch.cuda.current_stream = lambda *a, **k: _InertStream()
        torch.cuda.stream = _stream_ctx
        from megatron.core.tensor_parallel import random as mrandom

        mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
        _mode = _CudaToCpuMode()
        _mode.__enter__()  # patch 2, for the rest of the process
        _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled


def cpu_model_config_overrides(pipeline_parallel_size: int, params_dtype: torch.dtype) -> dict:
    """TransformerConfig fields that must be set when running on CPU (see module docstring)."""
    out = {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": False,
        "batch_p2p_comm": False,
    }
    if pipeline_parallel_size > 1:
        out["pipeline_dtype"] = params_dtype
    return out


def check_config(config) -> None:
    """Refuse a TransformerConfig that would run wrongly on CPU. Raises ValueError naming the field."""
    if torch.cuda.is_available():
        return
    wrong = {k: v for k, v in cpu_model_config_overrides(
        config.pipeline_model_parallel_size, config.params_dtype).items()
        if getattr(config, k) != v}
    if wrong:
        fields = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        raise ValueError(f"TransformerConfig on CPU needs {fields} (see megatron_ext.cpu_compat)")


def fix_shared_adam_step(optimizer) -> None:
    """After ``load_state_dict`` of a megatron optimizer with the torch AdamW fallback, every
    parameter shares ONE ``step`` tensor, so AdamW increments it once per parameter per step
    and a resumed run silently diverges (megatron-core 0.16.1). Give each state its own copy.
    Harmless on CUDA, so it is applied everywhere."""
    for opt in _inner_torch_optimizers(optimizer):
        seen = set()
        for state in opt.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))


def _inner_torch_optimizers(optimizer):
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in _inner_torch_optimizers(c)]
    inner = getattr(optimizer, "optimizer", None)
    return _inner_torch_optimizers(inner) if inner is not None else []
