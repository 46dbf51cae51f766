"""Pure-text answer handling: final-answer extraction, the format check, the answer key, the JEPO split.

Everything here runs in the trainer process on plain strings, in time linear in the response
length, so none of it needs the worker pool's timeouts. The expensive, possibly non-terminating
part (deciding whether two answers are mathematically equal) lives in `math_check`.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced_group(text: str, start: int) -> int | None:
    """(text, index of an opening brace) -> index one past its matching closing brace, or None.

    A backslash escapes the next character, so `\\{` and `\\}` (set braces) do not count.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Response text -> the content of its last `\\boxed{...}` (or `\\fbox{...}`), or None.

    Nested braces are matched. If the last box is unterminated (a truncated response) there is
    no boxed answer: an earlier box was, by the model's own account, not its final answer.
    `\\boxed 5` (no braces) yields the next whitespace-delimited token.
    """
    last = -1
    command = ""
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        if pos > last:
            last, command = pos, cmd
    if last < 0:
        return None
    i = last + len(command)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        end = _braced_group(text, i)
        return None if end is None else text[i + 1 : end - 1]
    if i == last + len(command):
        # `\boxedfoo` is a different command, not a box.
        return None
    token = re.match(r"[^\s$]+", text[i:])
    return token.group(0) if token else None


def _after_marker(text: str, marker: str) -> str | None:
    """Response text, marker -> the rest of the line after the marker's last occurrence, or None."""
    hits = list(re.finditer(re.escape(marker), text, re.IGNORECASE))
    if not hits:
        return None
    rest = text[hits[-1].end() :].lstrip(" \t:")
    line = rest.split("\n", 1)[0].strip()
    line = line.rstrip(".").strip()
    if line.startswith("$") and line.endswith("$") and len(line) > 1:
        line = line.strip("$").strip()
    return line or None


def extract_answer(text: str, marker: str | None = "The final answer is") -> str | None:
    """Response text -> its final answer: the last `\\boxed{...}`, else the text after `marker`.

    The marker is matched case-insensitively at its last occurrence and the answer runs to the
    end of that line (trailing period and enclosing `$` removed). None when neither is present.
    """
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if marker:
        return _after_marker(text, marker)
    return None


def format_ok(text: str, pattern: re.Pattern[str] | None = None) -> bool:
    """Response text, optional compiled regex -> whether the response has the required format.

    With no pattern the format is "ends with a complete `\\boxed{...}` answer" (the last box is
    closed and non-empty); with a pattern, `pattern.search(text)` must match.
    """
    if pattern is None:
        boxed = extract_boxed(text)
        return boxed is not None and bool(boxed.strip())
    return pattern.search(text) is not None


_DROP = re.compile(r"\\left|\\right|\\[,;:! ]|\\displaystyle|\^\{?\\circ\}?")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """Extracted answer -> the normalised string used as its COPO answer key.

    Only rewrites that cannot change the value: spacing commands, `\\left`/`\\right`, degree
    marks, `\\dfrac`/`\\tfrac` -> `\\frac`, `\\text{...}` unwrapped, enclosing `$`, whitespace, a
    trailing period. Value-level equality (0.5 vs 1/2) is math-verify's job, not this function's.
    """
    s = answer.strip()
    if len(s) > 1 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$")
    s = _DROP.sub("", s)
    s = _TEXT.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def split_at_delimiter(text: str, delimiter: str = "The final answer is") -> tuple[str, bool]:
    """Response text -> (chain of thought up to and including the delimiter, whether it was found).

    JEPO (specs/algorithms.md section 5) scores the reference answer after the policy's own
    chain of thought, cut at the FIRST case-insensitive occurrence of the delimiter. When the
    delimiter is missing the whole text comes back with found=False (the sample is invalid).
    """
    if not delimiter:
        raise ValueError("split_at_delimiter: the delimiter is empty; set reward.jepo_delimiter")
    hit = re.search(re.escape(delimiter), text, re.IGNORECASE)
    if hit is None:
        return text, False
    return text[: hit.end()], True
