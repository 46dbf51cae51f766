"""The rollout-engine interface: prompts in, sampled completions with log-probs out.

Every engine (the in-process :class:`~inference.embedded.EmbeddedEngine`, the
:class:`~inference.sglang_engine.SGLangEngine` over HTTP) implements
:class:`RolloutEngine`. The trainer sees only this module:

    groups = engine.generate(prompt_token_ids, n=8, sampling=SamplingParams(temperature=1.0))
    # groups[p][i]: Completion of sample i for prompt p
    engine.update_weights(export_hf_weights(model, bucket_bytes=...), version=step)

Log-probs follow SGLang's definition (its sampler without
``SGLANG_RETURN_ORIGINAL_LOGPROB``): the log-probability of the sampled token under
``log_softmax(logits / temperature)``, *before* top-k/top-p truncation, so they are what
the trainer recomputes from its own logits divided by the same temperature. Greedy
decoding (temperature 0) reports ``log_softmax(logits)``.

Seeds: a request seed fixes every sample. Sample ``i`` of prompt ``p`` draws from its own
random stream seeded with :func:`row_seed` ``(seed, p, i)``, so a completion does not
depend on which other sequences share its batch, on which server produced it, or on the
order requests arrive in; the HTTP client sends that per-row seed as SGLang's
``sampling_seed``.
"""

from __future__ import annotations

import abc
import math
import secrets
from dataclasses import dataclass
from typing import Iterable, Sequence

# What an engine accepts as new weights: `(hf_name, tensor)` pairs, or buckets of them
# (lists/tuples of pairs, or dicts name -> tensor), as produced by the checkpoint
# exporter. See `inference.weight_stream.iter_buckets`.
WeightStream = Iterable

FINISH_STOP = "stop"      # a stop token id, the EOS token or a stop string matched
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ABORT = "abort"    # the server aborted the request (pause for a weight update, shutdown)
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Field names and defaults follow SGLang's ``sampling_params``.

    ``top_k=-1`` means the whole vocabulary; ``temperature=0`` means greedy. ``stop``
    strings need a tokenizer on the engine side (they are matched on decoded text);
    ``stop_token_ids`` do not. The model's EOS token always stops unless
    ``ignore_eos``. ``seed=None`` samples from fresh entropy.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; frozen dataclasses need hashable tuples.
        object.__setattr__(self, "stop", tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain empty strings")


@dataclass
class Completion:
    """One sampled continuation of one prompt.

    ``token_ids`` [T] and ``logprobs`` [T] are aligned: ``logprobs[t]`` is the
    temperature-scaled log-probability of ``token_ids[t]``. A matched stop token (or
    the token that completed a stop string) is included, as SGLang includes it.
    ``weight_version`` is the version of the weights the whole completion was sampled
    with (see :meth:`RolloutEngine.update_weights`).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: int
    matched_stop: int | str | None = None

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logprobs), (len(self.token_ids), len(self.logprobs))
        assert self.finish_reason in FINISH_REASONS, self.finish_reason


class EngineClosedError(RuntimeError):
    """The engine was closed while a call was in flight, or used after close()."""


class RolloutEngine(abc.ABC):
    """Samples completions and takes new weights. One instance per model replica set.

    Engines are context managers: ``with EmbeddedEngine(...) as engine: ...`` closes them.
    """

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version of the weights currently served (0 = the weights loaded at start)."""

    @abc.abstractmethod
    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        """Sample ``n`` completions for each prompt.

        ``prompt_token_ids``: P prompts of token ids (ragged). Returns [P][n]
        completions, prompt-major, in input order.
        """

    @abc.abstractmethod
    def update_weights(self, stream: WeightStream, *, version: int | None = None) -> int:
        """Load new weights from a stream of ``(hf_name, tensor)`` pairs or buckets.

        Tensors are full (unsharded) HF-layout tensors, CPU or GPU. Names and shapes are
        checked against the served model and a mismatch raises an error naming the
        tensor. Returns the new weight version (``version``, or the current one + 1).
        Completions sampled afterwards carry it.
        """

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Give back the accelerator memory held for generation (colocated training)."""

    @abc.abstractmethod
    def resume_memory(self) -> None:
        """Re-acquire what :meth:`release_memory` gave back; weights are preserved."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine; in-flight calls fail with :class:`EngineClosedError`. Idempotent."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index`` under request seed ``seed``.

    A 63-bit integer (fits SGLang's ``sampling_seed`` and ``torch.Generator.manual_seed``).
    splitmix64 chaining decorrelates neighbouring rows, which plain ``seed + i`` would not.
    """
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (prompt_index & _MASK64))
    x = _splitmix64(x ^ ((sample_index * 0xD1B54A32D192ED03) & _MASK64))
    return x >> 1


def fresh_seed() -> int:
    """A 63-bit seed from the OS entropy pool, for requests without a seed.

    Not from torch's global generator: a trainer that calls ``torch.manual_seed`` every
    step would otherwise get the same "unseeded" rollouts every step.
    """
    return secrets.randbits(63)
