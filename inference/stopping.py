"""When a sampled sequence stops: stop token ids, EOS, stop strings, length.

Stop strings are matched on decoded text, as SGLang does, so they need a tokenizer;
stop token ids and EOS do not. The matched token stays in the completion (its
log-prob was sampled like any other), and ``matched`` says what stopped it.
"""

from __future__ import annotations

from typing import Callable, Sequence

from inference.engine import FINISH_LENGTH, FINISH_STOP, SamplingParams

Decode = Callable[[Sequence[int]], str]


class StopChecker:
    """Stop rules of one row. ``check`` is called after every appended token."""

    def __init__(self, sampling: SamplingParams, eos_token_ids: frozenset[int], decode: Decode | None):
        self.max_new_tokens = sampling.max_new_tokens
        self.stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else eos_token_ids)
        self.stop_strs = sampling.stop
        if self.stop_strs and decode is None:
            raise ValueError(
                f"SamplingParams.stop={list(self.stop_strs)!r} needs a tokenizer to match decoded text, "
                "and this engine has none (save one next to the model, or use stop_token_ids)"
            )
        self.decode = decode
        # A multi-byte character can take up to 4 byte-level tokens, so 4 tokens per
        # character of the longest stop string always cover it; decoding only this tail
        # keeps the check O(1) per step instead of re-decoding the whole completion.
        self.window = 4 * max((len(s) for s in self.stop_strs), default=0) + 4

    def check(self, generated: Sequence[int]) -> tuple[str, int | str | None] | None:
        """generated: the row's tokens so far (prompt excluded) -> (finish_reason, matched) or None."""
        last = generated[-1]
        if last in self.stop_ids:
            return FINISH_STOP, last
        if self.stop_strs:
            # A stop string inside the previous window would have stopped the row one step
            # earlier, so any match found now was completed by the newest token.
            tail = self.decode(generated[-self.window:])
            for stop in self.stop_strs:
                if stop in tail:
                    return FINISH_STOP, stop
        if len(generated) >= self.max_new_tokens:
            return FINISH_LENGTH, None
        return None
