"""math-verify checks, meant to run inside `WorkerPool` processes (never in the trainer).

math-verify can take unbounded time and memory: `\\boxed{9^{9^{9^{9^9}}}}` makes sympy compute a
gigantic integer inside one C call that holds the GIL, so neither a thread nor math-verify's
own `signal.alarm` timeout can interrupt it. Only killing the process can, which is what the
pool does from the parent. Its signal timeouts are therefore switched off here
(`parsing_timeout=None`, `timeout_seconds=None`), which also keeps these functions callable
from any thread.
"""

from __future__ import annotations

import logging

from math_verify import parse, verify

from pipeline.rewards.answers import normalize_answer

# math-verify warns on every call that its timeout is off; the pool enforces it instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(answer: str) -> list:
    """Answer string -> math-verify's parsed candidates ([] when nothing parses)."""
    text = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    return parse(text, parsing_timeout=None)


def verify_answer(predicted: str, reference: str) -> bool:
    """(extracted answer, reference answer) -> whether math-verify judges them equal.

    Answers math-verify cannot parse (free text such as a name) fall back to equality of the
    normalised strings, so "Paris" still matches "Paris".
    """
    gold = _parse(reference)
    pred = _parse(predicted)
    if gold and pred and verify(gold, pred, timeout_seconds=None):
        return True
    return normalize_answer(predicted) == normalize_answer(reference)


def answers_equivalent(a: str, b: str) -> bool:
    """(answer, answer) -> whether they are equal in both directions of math-verify's check.

    `verify(gold, pred)` is not symmetric (a gold `x=3` accepts `3`); an equivalence class must
    not depend on which answer came first, so both directions are required.
    """
    pa, pb = _parse(a), _parse(b)
    if not pa or not pb:
        return normalize_answer(a) == normalize_answer(b)
    return bool(verify(pa, pb, timeout_seconds=None) and verify(pb, pa, timeout_seconds=None))
