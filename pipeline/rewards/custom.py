"""Custom reward functions, named by import path in `reward.function: "my_pkg.rewards:score"`.

The signature a custom reward function must have::

    def score(response: str, answer: str | None, *, prompt: str | None,
              extra: dict[str, Any], **kwargs) -> float | Mapping[str, Any]

- `response`: the generated text (no prompt).
- `answer`: the row's reference answer, or None when the dataset has no answer field.
- `prompt`: the prompt text the model saw (chat template applied), or None if not given.
- `extra`: the row's pass-through fields (`data.extra_fields`), {} if none.
- `kwargs`: `reward.function_kwargs` from the config, passed unchanged.

Return a finite number, or a mapping `{"reward": float, "answer_key": str | None}` to choose the
COPO answer key yourself (otherwise the key comes from the extracted final answer). The function
runs in a worker process under `reward.timeout_s`: it must be importable there (a module on the
path, not a lambda), and its arguments and return value must pickle. A function that raises,
hangs, or returns a non-finite number scores 0 and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.rewards.pool import resolve_function


def call_reward(
    fn_path: str,
    response: str,
    answer: str | None,
    prompt: str | None,
    extra: dict[str, Any],
    kwargs: dict[str, Any],
) -> Any:
    """Worker-side: (function path, response, answer, prompt, extra, kwargs) -> its raw return value."""
    return resolve_function(fn_path)(response, answer, prompt=prompt, extra=extra, **kwargs)


def coerce_reward(value: Any, fn_path: str) -> tuple[float, str | None, bool]:
    """A custom function's return value -> (reward, answer_key override, has_override).

    Raises ValueError with the function's name for a value that is not a finite number or a
    mapping with a finite "reward".
    """
    key, has_key = None, False
    if isinstance(value, Mapping):
        if "reward" not in value:
            raise ValueError(f"{fn_path} returned a mapping without a 'reward' entry: {value!r}")
        if "answer_key" in value:
            key, has_key = value["answer_key"], True
            if key is not None and not isinstance(key, str):
                raise ValueError(f"{fn_path} returned answer_key {key!r}; it must be a str or None")
        value = value["reward"]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"{fn_path} returned {value!r}; a reward must be a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"{fn_path} returned a non-finite reward {reward!r}")
    return reward, key, has_key
