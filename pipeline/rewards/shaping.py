"""Reward terms added on top of the correctness score: format and DAPO overlong shaping."""

from __future__ import annotations

import re

from pipeline.rewards.answers import extract_boxed


def format_ok(text: str, pattern: re.Pattern[str] | None = None) -> bool:
    """Response text, optional compiled regex -> whether the response has the required format.

    With no pattern the format is "ends with a complete `\\boxed{...}` answer" (the last box is
    closed and non-empty); with a pattern, `pattern.search(text)` must match.
    """
    if pattern is None:
        boxed = extract_boxed(text)
        return boxed is not None and bool(boxed.strip())
    return pattern.search(text) is not None


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """(response length in tokens, L_max, L_c) -> DAPO's soft overlong penalty in [-1, 0].

    DAPO eq. 13: 0 up to `L_max - L_c`, then falling linearly to -1 at `L_max`, -1 beyond.
    A buffer of 0 gives the hard form: -1 only past `L_max`.
    """
    if not 0 <= buffer <= max_length:
        raise ValueError(f"overlong buffer {buffer} must lie in [0, max_length={max_length}]")
    free = max_length - buffer
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / buffer
    return -1.0
