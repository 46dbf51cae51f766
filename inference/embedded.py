"""The embedded rollout engine: batched sampling with a KV cache on `transformers`, in process.

The CPU default (tiny example, tests) and the model behind the SGLang stand-in server
(:mod:`inference.serve`); it also runs on a GPU. It owns its sampling loop instead of
calling ``model.generate`` because RL needs exact per-token log-probs of the sampled
tokens under ``log_softmax(logits / T)`` and per-row seeds (see :mod:`inference.engine`);
``generate``'s processors warp logits before sampling, and its seeding is per batch.

One batch: prompts are left-padded to a common length, position ids come from the
attention mask (so padding does not shift positions), the prefill keeps only the last
position's logits, and every decode step feeds one token per live row through the
cache. Rows that finish are dropped from the cache (``batch_select_indices``), so long
tails cost only the rows still running.

Memory release (colocated training): on an accelerator, :meth:`release_memory` moves the
weights to host memory and empties the allocator cache; :meth:`resume_memory` moves
them back, unchanged. On CPU there is nothing to hand back — the KV cache lives only
inside a ``generate`` call and weights already sit in host memory — so release only
marks the engine as released (``generate`` refuses until resumed; weight updates are
allowed, they land in host memory either way).
"""

from __future__ import annotations

import difflib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from inference.engine import (
    FINISH_ABORT,
    Completion,
    EngineClosedError,
    RolloutEngine,
    SamplingParams,
    WeightStream,
    fresh_seed,
    row_seed,
)
from inference.sampling import sample_next
from inference.stopping import StopChecker
from inference.weight_stream import iter_buckets

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RowRequest:
    """One sequence to sample: its prompt, its sampling parameters and its own seed."""

    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    seed: int


class MemoryReleasedError(RuntimeError):
    """generate() was called between release_memory() and resume_memory()."""


def _eos_ids(model) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _load_tokenizer(path: Path):
    """The tokenizer saved next to the model, or None (token-id interfaces need none)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class EmbeddedEngine(RolloutEngine):
    """Samples from a `transformers` causal LM held in this process.

    ``model``: a ``PreTrainedModel`` (moved to ``device``); ``tokenizer``: optional, needed
    only for stop strings. ``max_batch_size`` bounds the rows run in one forward.
    Thread-safe: calls are serialised by a lock.
    """

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        weight_version: int = 0,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = _eos_ids(self.model)
        self._version = int(weight_version)
        self._lock = threading.RLock()
        self._released = False
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        tokenizer: str | Path | None = "auto",
        **kwargs,
    ) -> "EmbeddedEngine":
        """Load an HF checkpoint directory. ``tokenizer="auto"`` loads one saved next to it, if any."""
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        path = Path(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
        tok = _load_tokenizer(path if tokenizer == "auto" else Path(tokenizer)) if tokenizer else None
        return cls(model, tokenizer=tok, device=device, **kwargs)

    @property
    def weight_version(self) -> int:
        return self._version

    def set_weight_version(self, version: int) -> None:
        """Relabel the served weights (SGLang's /update_weight_version) without loading any."""
        with self._lock:
            self._version = int(version)

    @property
    def released(self) -> bool:
        return self._released

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        seed = sampling.seed if sampling.seed is not None else fresh_seed()
        rows = [
            RowRequest(prompt, sampling, row_seed(seed, p, i))
            for p, prompt in enumerate(prompt_token_ids)
            for i in range(n)
        ]
        flat = self.generate_rows(rows)
        return [flat[p * n : (p + 1) * n] for p in range(len(prompt_token_ids))]

    def generate_rows(
        self, rows: Sequence[RowRequest], should_abort: Callable[[], bool] | None = None
    ) -> list[Completion]:
        """Sample every row (each with its own parameters and seed); results in input order.

        ``should_abort`` is polled once per decode step; when it returns True the rows
        still running finish with reason ``abort`` (what SGLang's pause does).
        """
        for r, row in enumerate(rows):
            self.check_prompt(r, row.prompt_token_ids)
        decode = self._decode if self.tokenizer is not None else None
        checkers = [StopChecker(row.sampling, self.eos_token_ids, decode) for row in rows]
        with self._lock:
            if self._closed:
                raise EngineClosedError("EmbeddedEngine is closed")
            if self._released:
                raise MemoryReleasedError("EmbeddedEngine memory is released; call resume_memory() before generate()")
            # Similar lengths share a batch so left-padding wastes little compute.
            order = sorted(range(len(rows)), key=lambda r: len(rows[r].prompt_token_ids))
            out: list[Completion | None] = [None] * len(rows)
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start : start + self.max_batch_size]
                done = self._run_batch([rows[r] for r in chunk], [checkers[r] for r in chunk], should_abort)
                for r, completion in zip(chunk, done):
                    out[r] = completion
        return out  # type: ignore[return-value]

    def check_prompt(self, index: int, prompt: Sequence[int]) -> None:
        """Raise ValueError naming prompt ``index`` if it is empty or leaves the vocabulary."""
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"prompt {index} has token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @torch.inference_mode()
    def _run_batch(self, rows, checkers, should_abort) -> list[Completion]:
        """B rows -> B completions: one prefill over the left-padded prompts [B, L] keeping
        the last logits [B, V], then one decode step [live, 1] per new token."""
        device = self.device
        batch = len(rows)
        lengths = [len(r.prompt_token_ids) for r in rows]
        width = max(lengths)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - lengths[b] :] = torch.as_tensor(list(row.prompt_token_ids), dtype=torch.long)
            attention[b, width - lengths[b] :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        steps = max(r.sampling.max_new_tokens for r in rows)
        # Each row's draws come from its own generator on the CPU, so the same seed gives
        # the same tokens on CPU and GPU and whatever the batch around it.
        uniforms = torch.zeros(batch, steps)
        for b, row in enumerate(rows):
            gen = torch.Generator().manual_seed(row.seed)
            uniforms[b, : row.sampling.max_new_tokens] = torch.rand(row.sampling.max_new_tokens, generator=gen)
        temperature = torch.tensor([r.sampling.temperature for r in rows], dtype=torch.float32)
        top_p = torch.tensor([r.sampling.top_p for r in rows], dtype=torch.float32)
        top_k = torch.tensor(
            [r.sampling.top_k if r.sampling.top_k > 0 else self.vocab_size for r in rows], dtype=torch.long
        )
        temperature, top_p, top_k, uniforms = (t.to(device) for t in (temperature, top_p, top_k, uniforms))
        attention, positions = attention.to(device), positions.to(device)

        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        last_pos = positions[:, -1]

        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finish: list[tuple[str, int | str | None] | None] = [None] * batch
        live = list(range(batch))  # row index of each batch position still in the cache
        for step in range(steps):
            live_t = torch.tensor(live, device=device)
            tok, lp = sample_next(
                logits, temperature[live_t], top_k[live_t], top_p[live_t], uniforms[live_t, step]
            )
            tok_list, lp_list = tok.tolist(), lp.tolist()
            keep = []
            for pos, b in enumerate(live):
                tokens[b].append(tok_list[pos])
                logprobs[b].append(lp_list[pos])
                finish[b] = checkers[b].check(tokens[b])
                if finish[b] is None:
                    keep.append(pos)
            if not keep:
                break
            if should_abort is not None and should_abort():
                for pos in keep:
                    finish[live[pos]] = (FINISH_ABORT, None)
                break
            if len(keep) < len(live):
                keep_t = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep_t)
                attention, last_pos, tok = attention[keep_t], last_pos[keep_t], tok[keep_t]
                live = [live[pos] for pos in keep]
            attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
            last_pos = last_pos + 1
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=attention,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()

        return [
            Completion(
                token_ids=tokens[b],
                logprobs=logprobs[b],
                finish_reason=finish[b][0],
                weight_version=self._version,
                matched_stop=finish[b][1],
            )
            for b in range(batch)
        ]

    # ------------------------------------------------------------------ weights

    def update_weights(self, stream: WeightStream, *, version: int | None = None) -> int:
        """Copy the stream's tensors into the model in place (dtype/device converted).

        Each bucket is checked whole (every name known, every shape equal) before any of
        it is copied, so a bad bucket leaves the model as it was after the previous one.
        Tied weights (``lm_head.weight`` sharing the embedding) may arrive under either name.
        """
        with self._lock:
            if self._closed:
                raise EngineClosedError("EmbeddedEngine is closed")
            targets = self.model.state_dict(keep_vars=True)
            loaded = 0
            for bucket in iter_buckets(stream):
                for name, tensor in bucket:
                    target = targets.get(name)
                    if target is None:
                        near = difflib.get_close_matches(name, list(targets), n=1)
                        hint = f"; did you mean {near[0]!r}?" if near else ""
                        raise KeyError(f"weight update names tensor {name!r}, which the served model does not have{hint}")
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ValueError(
                            f"weight update tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"the served model expects {tuple(target.shape)}"
                        )
                with torch.no_grad():
                    for name, tensor in bucket:
                        targets[name].copy_(tensor)
                loaded += len(bucket)
            if loaded == 0:
                raise ValueError("weight update stream was empty; nothing was loaded")
            self._version = int(version) if version is not None else self._version + 1
            logger.info("loaded %d tensors, weight version %d", loaded, self._version)
            return self._version

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The served weights by HF name (read-only views; for checks and tests)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ memory

    def release_memory(self) -> None:
        with self._lock:
            if self._released:
                return
            if self.device.type != "cpu":
                self.model.to("cpu")
                getattr(torch, self.device.type).empty_cache()
            self._released = True

    def resume_memory(self) -> None:
        with self._lock:
            if not self._released:
                return
            if self.device.type != "cpu":
                self.model.to(self.device)
            self._released = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
