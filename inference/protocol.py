"""SGLang's native HTTP protocol: the JSON shapes the client sends and the stand-in serves.

One module for both sides, so the client (:mod:`inference.sglang_client`) and the CPU
stand-in server (:mod:`inference.serve`) cannot drift apart. Shapes follow SGLang
**v0.5.5** (``python/sglang/srt/entrypoints/http_server.py``, ``managers/io_struct.py``,
``sampling/sampling_params.py``); v0.5.5 is the first release whose
``/pause_generation`` takes a ``mode``; earlier ones ignore the body.

``POST /generate`` (one sequence per request; sglang-router 0.3 rejects a list of
``sampling_params``, so the client never batches in the body)::

    {"input_ids": [int], "rid": str, "return_logprob": true,
     "sampling_params": {"max_new_tokens", "temperature", "top_p", "top_k",
                         "stop": [str], "stop_token_ids": [int], "ignore_eos",
                         "sampling_seed": int}}
    -> {"text": str, "output_ids": [int],
        "meta_info": {"id": str, "prompt_tokens": int, "completion_tokens": int,
                      "weight_version": str,
                      "finish_reason": {"type": "stop", "matched": int | str}
                                     | {"type": "length", "length": int}
                                     | {"type": "abort", "message": str},
                      "output_token_logprobs": [[logprob, token_id, null], ...]}}

``sampling_seed`` is honoured by SGLang only with ``--enable-deterministic-inference``
(the launcher passes it when a seed is wanted). Weight versions travel as strings;
SGLang's default is ``"default"``, read here as version 0.

Tensor payloads of ``/update_weights_from_tensor``: real SGLang takes
``serialized_named_tensors`` = one ``MultiprocessingSerializer`` string per TP rank — a
base64 ``ForkingPickler`` dump whose CUDA tensors travel as IPC handles, so it only
works between processes on the same GPU node (colocated mode). Over HTTP on CPU the
same pickle would carry shared-memory file descriptors that cannot cross a socket, and
unpickling network input executes code. The stand-in therefore accepts
``load_format = STAND_IN_TENSOR_FORMAT``: each entry is the base64 of a safetensors
file (header + raw bytes, no code), which the client produces for it.
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import torch

from inference.engine import FINISH_REASONS, Completion, SamplingParams

SGLANG_VERSION = "0.5.5"
STAND_IN_TENSOR_FORMAT = "groupwise_safetensors_b64"
SERVER_KIND_KEY = "groupwise_stand_in"  # in /get_server_info of the stand-in only

# SGLang spells "whole vocabulary" as -1 on input and 1 << 30 internally.
_TOP_K_ALL = 1 << 30

# Sampling options the stand-in does not implement. Accepting them silently would
# sample from a different distribution than asked, so a non-default value is an error.
_UNSUPPORTED_DEFAULTS = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "stop_regex": None,
    "logit_bias": None,
    "custom_params": None,
    "n": 1,
}
# Options that only shape the returned text, never the tokens or log-probs.
_TEXT_ONLY = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}


class ProtocolError(ValueError):
    """A request or response does not have the shape SGLang's protocol specifies."""


def sampling_to_wire(sampling: SamplingParams, seed: int | None) -> dict[str, Any]:
    """SamplingParams (+ the row's seed) -> SGLang ``sampling_params`` dict."""
    wire: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "ignore_eos": sampling.ignore_eos,
        # Completions carry token ids; text is never trimmed so it stays aligned with them.
        "no_stop_trim": True,
    }
    if sampling.stop:
        wire["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        wire["stop_token_ids"] = list(sampling.stop_token_ids)
    if seed is not None:
        wire["sampling_seed"] = int(seed)
    return wire


def sampling_from_wire(wire: dict[str, Any] | None) -> tuple[SamplingParams, int | None]:
    """SGLang ``sampling_params`` -> (SamplingParams, row seed or None). Raises ProtocolError."""
    wire = dict(wire or {})
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        value = wire.pop(key, default)
        if value is not None and value != default:
            raise ProtocolError(f"sampling_params.{key}={value!r} is not supported by this server")
    for key in _TEXT_ONLY:
        wire.pop(key, None)

    def pick(key, default):
        value = wire.pop(key, None)
        return default if value is None else value

    stop = pick("stop", ())
    top_k = int(pick("top_k", -1))
    try:
        sampling = SamplingParams(
            max_new_tokens=int(pick("max_new_tokens", 128)),
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=-1 if top_k >= _TOP_K_ALL else top_k,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(pick("stop_token_ids", ())),
            ignore_eos=bool(pick("ignore_eos", False)),
        )
    except (TypeError, ValueError) as err:
        raise ProtocolError(str(err).replace("SamplingParams.", "sampling_params.")) from err
    seed = wire.pop("sampling_seed", None)
    if wire:
        raise ProtocolError(f"unknown sampling_params fields {sorted(wire)}")
    return sampling, None if seed is None else int(seed)


def generate_request(prompt: Sequence[int], sampling: SamplingParams, seed: int | None, rid: str) -> dict[str, Any]:
    """The ``/generate`` body for one sequence."""
    return {
        "input_ids": list(prompt),
        "sampling_params": sampling_to_wire(sampling, seed),
        "return_logprob": True,
        "rid": rid,
    }


def parse_weight_version(value: Any) -> int:
    """SGLang's string weight version -> int (its initial ``"default"`` is 0)."""
    if value is None or value == "default":
        return 0
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"weight_version {value!r} is not an integer; launch servers with --weight-version 0") from err


def completion_from_wire(body: Any, server: str) -> Completion:
    """A ``/generate`` response for one sequence -> Completion. ``server`` names it in errors."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise ProtocolError(f"{server}: /generate answered {str(body)[:200]!r}, expected an object with meta_info")
    meta = body["meta_info"]
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or reason.get("type") not in FINISH_REASONS:
        raise ProtocolError(f"{server}: meta_info.finish_reason={reason!r} is not one of {FINISH_REASONS}")
    entries = meta.get("output_token_logprobs")
    if entries is None:
        if reason["type"] == "abort":
            entries = []
        else:
            raise ProtocolError(f"{server}: meta_info.output_token_logprobs missing (request return_logprob=true)")
    return Completion(
        token_ids=[int(e[1]) for e in entries],
        logprobs=[float(e[0]) for e in entries],
        finish_reason=reason["type"],
        weight_version=parse_weight_version(meta.get("weight_version")),
        matched_stop=reason.get("matched"),
    )


def completion_to_wire(completion: Completion, *, rid: str, prompt_tokens: int, text: str) -> dict[str, Any]:
    """Completion -> the ``/generate`` response for one sequence (server side)."""
    if completion.finish_reason == "length":
        reason: dict[str, Any] = {"type": "length", "length": len(completion.token_ids)}
    elif completion.finish_reason == "stop":
        reason = {"type": "stop", "matched": completion.matched_stop}
    else:
        reason = {"type": "abort", "message": "request aborted by /pause_generation or /abort_request"}
    return {
        "text": text,
        "output_ids": completion.token_ids,
        "meta_info": {
            "id": rid,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(completion.token_ids),
            "weight_version": str(completion.weight_version),
            "finish_reason": reason,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(completion.logprobs, completion.token_ids)],
        },
    }


# ---------------------------------------------------------------------- tensor payloads


def encode_bucket_safetensors(bucket: Sequence[tuple[str, torch.Tensor]]) -> str:
    """[(hf_name, tensor)] -> base64 safetensors string (the stand-in's tensor payload)."""
    from safetensors.torch import save

    tensors = {}
    for name, tensor in bucket:
        if name in tensors:
            raise ProtocolError(f"tensor {name!r} appears twice in one weight bucket")
        # safetensors refuses views that share storage; a contiguous CPU copy is what goes on the wire anyway.
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return base64.b64encode(save(tensors)).decode("ascii")


def decode_bucket_safetensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    try:
        return list(load(base64.b64decode(payload, validate=True)).items())
    except Exception as err:  # binascii.Error, SafetensorError: both mean a malformed payload
        raise ProtocolError(f"serialized_named_tensors entry is not base64 safetensors: {err}") from err


def encode_bucket_sglang(bucket: Sequence[tuple[str, torch.Tensor]], tp_size: int) -> list[str]:
    """[(hf_name, tensor)] -> SGLang's ``serialized_named_tensors`` (one entry per TP rank).

    Needs ``sglang`` importable (GPU environment). CUDA tensors travel as IPC handles, so
    the server must run on the same node and the tensors must stay alive until the
    request returns.
    """
    serializer = _sglang_serializer()
    # Every TP rank gets the same handles: each opens the IPC memory of the trainer's GPU.
    payload = serializer.serialize(list(bucket), output_str=True)
    return [payload] * tp_size


def _sglang_serializer():
    """SGLang's MultiprocessingSerializer, imported lazily (sglang lives in the gpu extra only)."""
    import importlib

    for module in ("sglang.srt.utils", "sglang.srt.utils.common"):  # it moved between releases
        try:
            return importlib.import_module(module).MultiprocessingSerializer
        except (ImportError, AttributeError):
            continue
    raise RuntimeError(
        "update_weights_from_tensor with real SGLang servers needs the sglang package "
        "(install the `gpu` extra) to serialize tensors"
    )


def dtype_to_wire(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (SGLang resolves it with ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_wire(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"dtype {name!r} is not a torch dtype")
    return dtype
