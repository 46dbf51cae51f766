"""Score a step's responses: correctness in a worker pool, a format term, answer keys.

`RewardScorer(config).score(responses, answers, ...)` is the one call the trainer makes per
rollout step. Correctness (math-verify, or a custom function) runs concurrently in a
`WorkerPool` with a deadline per response; everything else is cheap string work done here.
Every failure mode of a single response (timeout, exception, crashed worker, non-finite value)
scores `incorrect_reward`, is counted, and never fails the step.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline.rewards.answers import extract_answer, format_ok, normalize_answer, split_at_delimiter
from pipeline.rewards.custom import coerce_reward
from pipeline.rewards.keys import class_ids, distinct_pairs
from pipeline.rewards.pool import OK, TIMEOUT, TaskOutcome, WorkerPool, resolve_function

logger = logging.getLogger(__name__)

_VERIFY = "pipeline.rewards.math_check:verify_answer"
_EQUIVALENT = "pipeline.rewards.math_check:answers_equivalent"
_CUSTOM = "pipeline.rewards.custom:call_reward"
_KEY_MODES = ("string", "math_verify")
_START_METHODS = ("forkserver", "spawn")


@dataclass
class RewardConfig:
    """The `reward` section of the run config.

    function: "math" (math-verify of the extracted answer against the reference) or a custom
        reward function "package.module:function" (signature in `pipeline.rewards.custom`).
    function_kwargs: keyword arguments passed to a custom function.
    answer_marker: where the final answer is when there is no `\\boxed{}` ("" or None: boxed only).
    correct_reward / incorrect_reward: the math score; also what any failed call scores.
    format_pattern: a regex the response must match for the format term; None means "has a
        complete `\\boxed{...}`".
    format_weight: added to the reward when the format holds.
    format_required: a response failing the format scores `incorrect_reward` for correctness.
    answer_key_mode: COPO answer classes from equal normalised strings ("string"), or also
        merged when math-verify judges two answers of a group equal ("math_verify").
    jepo_delimiter: where a response's chain of thought ends, for JEPO.
    num_workers / timeout_s / memory_limit_mb / start_method: the worker pool; timeout_s is per
        call, memory_limit_mb the address-space cap of each worker (0: none).
    """

    function: str = "math"
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    answer_marker: str | None = "The final answer is"
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    format_pattern: str | None = None
    format_weight: float = 0.0
    format_required: bool = False
    answer_key_mode: str = "string"
    jepo_delimiter: str = "The final answer is"
    num_workers: int = 4
    timeout_s: float = 10.0
    memory_limit_mb: int = 4096
    start_method: str = "forkserver"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and how to fix it."""
        if self.function != "math" and ":" not in self.function:
            raise ValueError(
                f"reward.function={self.function!r}: use 'math' or an import path 'package.module:function'"
            )
        if self.answer_key_mode not in _KEY_MODES:
            raise ValueError(f"reward.answer_key_mode={self.answer_key_mode!r}: choose one of {_KEY_MODES}")
        if self.start_method not in _START_METHODS:
            raise ValueError(
                f"reward.start_method={self.start_method!r}: choose one of {_START_METHODS} "
                "(fork would copy the trainer's threads and accelerator state)"
            )
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers={self.num_workers}: must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s={self.timeout_s}: must be > 0 seconds")
        if self.memory_limit_mb < 0:
            raise ValueError(f"reward.memory_limit_mb={self.memory_limit_mb}: must be >= 0 (0 = no limit)")
        if self.format_pattern is not None:
            try:
                re.compile(self.format_pattern)
            except re.error as exc:
                raise ValueError(f"reward.format_pattern={self.format_pattern!r} is not a regex: {exc}") from exc
        if not self.jepo_delimiter:
            raise ValueError("reward.jepo_delimiter is empty: set the text that ends the chain of thought")


@dataclass
class RewardResult:
    """Per-response outputs of one `score` call, all lists in response order.

    rewards: the total reward (correctness + format term). DAPO's overlong shaping is not
        here: `pipeline.algorithms` adds it from the response mask, so it cannot apply twice.
    correct: whether the correctness check passed (math: verified; custom: its reward > 0).
    answers: the extracted final answer text, None when there is none.
    answer_keys: the COPO answer key (normalised answer string, or a custom function's choice).
    answer_ids: class id of each response's answer within its group (None without group_size).
    format_ok: whether the format term held.
    cot_ends: JEPO: character offset one past the delimiter, None when it is missing.
    counters: responses, correct, no_answer, no_reference, timeouts, errors, format_failures,
        answer_key_failures.
    """

    rewards: list[float]
    correct: list[bool]
    answers: list[str | None]
    answer_keys: list[str | None]
    answer_ids: list[int] | None
    format_ok: list[bool]
    cot_ends: list[int | None]
    counters: dict[str, int]


class RewardScorer:
    """Owns the worker pool; `score` turns a step's responses into a `RewardResult`.

    Calls from several threads are served one at a time. Close it (or use it as a context manager) to stop
    the workers. `totals` accumulates the counters of every call.
    """

    def __init__(self, config: RewardConfig):
        config.validate()
        self.config = config
        self._custom = config.function != "math"
        if self._custom:
            try:
                resolve_function(config.function)
            except ValueError as exc:
                raise ValueError(f"reward.function: {exc}") from exc
        self._format = re.compile(config.format_pattern) if config.format_pattern is not None else None
        imports = ["pipeline.rewards.math_check", "pipeline.rewards.custom"]
        if self._custom:
            imports.append(config.function.partition(":")[0])
        self._pool = WorkerPool(
            config.num_workers,
            memory_limit_mb=config.memory_limit_mb,
            start_method=config.start_method,
            imports=imports,
        )
        self.totals: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged = {"error": False, "timeout": False}

    def _note_failure(self, outcome: TaskOutcome, what: str, counters: Counter) -> None:
        """Count a failed pool call; log the first traceback and the first timeout of this scorer."""
        kind = "timeout" if outcome.status == TIMEOUT else "error"
        counters["timeouts" if kind == "timeout" else "errors"] += 1
        if not self._logged[kind]:
            self._logged[kind] = True
            if kind == "timeout":
                logger.warning("reward call timed out, scored 0 (%s); later timeouts are only counted: %s",
                               what, outcome.error)
            else:
                logger.error("reward function failed, scored 0 (%s); later failures are only counted:\n%s",
                             what, outcome.error)

    def _correctness(
        self,
        responses: Sequence[str],
        answers: Sequence[str | None],
        extracted: list[str | None],
        prompts: Sequence[str | None],
        extras: Sequence[dict],
        counters: Counter,
    ) -> tuple[list[float], list[bool], dict[int, str | None], set[int]]:
        """-> (score, correct, answer keys chosen by a custom function, responses that timed out)."""
        cfg = self.config
        n = len(responses)
        scores = [cfg.incorrect_reward] * n
        correct = [False] * n
        key_overrides: dict[int, str | None] = {}
        timed_out: set[int] = set()
        if self._custom:
            todo = list(range(n))
            calls = [
                ((cfg.function, responses[i], answers[i], prompts[i], extras[i], cfg.function_kwargs), {})
                for i in todo
            ]
            fn_path = _CUSTOM
        else:
            todo = []
            for i in range(n):
                if answers[i] is None:
                    counters["no_reference"] += 1
                elif extracted[i] is None:
                    counters["no_answer"] += 1
                else:
                    todo.append(i)
            calls = [((extracted[i], answers[i]), {}) for i in todo]
            fn_path = _VERIFY
        outcomes = self._pool.run(fn_path, calls, cfg.timeout_s) if calls else []
        for i, outcome in zip(todo, outcomes):
            shown = responses[i] if self._custom else extracted[i]
            what = f"{cfg.function}, response {i}: {shown[:80]!r}"
            if outcome.status != OK:
                self._note_failure(outcome, what, counters)
                if outcome.status == TIMEOUT:
                    timed_out.add(i)
                continue
            if not self._custom:
                correct[i] = bool(outcome.value)
                scores[i] = cfg.correct_reward if correct[i] else cfg.incorrect_reward
                continue
            try:
                reward, key, has_key = coerce_reward(outcome.value, cfg.function)
            except ValueError as exc:
                self._note_failure(TaskOutcome("error", error=str(exc)), what, counters)
                continue
            scores[i], correct[i] = reward, reward > 0
            if has_key:
                key_overrides[i] = key
        return scores, correct, key_overrides, timed_out

    def _answer_ids(self, keys: list[str | None], group_size: int, avoid: set[int], counters: Counter) -> list[int]:
        """Answer keys of whole groups (group-major) -> class id per response within its group.

        Responses in `avoid` already timed out once; comparing them again would only cost
        another timeout, so they stay in their own string-equality class.
        """
        groups = [keys[s : s + group_size] for s in range(0, len(keys), group_size)]
        pairs = []
        if self.config.answer_key_mode == "math_verify":
            for gi, group in enumerate(groups):
                base = gi * group_size
                pairs.append([(i, j) for i, j in distinct_pairs(group) if base + i not in avoid and base + j not in avoid])
        calls = [((g[i], g[j]), {}) for g, ps in zip(groups, pairs) for i, j in ps]
        outcomes = iter(self._pool.run(_EQUIVALENT, calls, self.config.timeout_s) if calls else [])
        ids: list[int] = []
        for gi, group in enumerate(groups):
            merges = []
            for pair in pairs[gi] if pairs else []:
                outcome = next(outcomes)
                if outcome.status != OK:
                    # Unproven equality keeps the classes apart; the reward is not affected.
                    counters["answer_key_failures"] += 1
                elif outcome.value:
                    merges.append(pair)
            ids.extend(class_ids(group, merges))
        return ids

    def score(
        self,
        responses: Sequence[str],
        answers: Sequence[str | None],
        prompts: Sequence[str | None] | None = None,
        *,
        extras: Sequence[dict[str, Any]] | None = None,
        group_size: int | None = None,
    ) -> RewardResult:
        """Responses and their references -> `RewardResult`, all lists of len(responses).

        `answers[i]` is the reference answer of response i's prompt (repeat it for each sample
        of a group). `prompts`/`extras` are passed to custom functions. `group_size` (responses
        are group-major: a prompt's samples are contiguous) enables `answer_ids`.
        """
        with self._lock:
            return self._score(responses, answers, prompts, extras, group_size)

    def _score(
        self,
        responses: Sequence[str],
        answers: Sequence[str | None],
        prompts: Sequence[str | None] | None,
        extras: Sequence[dict[str, Any]] | None,
        group_size: int | None,
    ) -> RewardResult:
        cfg = self.config
        n = len(responses)
        prompts = list(prompts) if prompts is not None else [None] * n
        extras = list(extras) if extras is not None else [{} for _ in range(n)]
        for name, seq in (("answers", answers), ("prompts", prompts), ("extras", extras)):
            if len(seq) != n:
                raise ValueError(f"score: {name} has {len(seq)} entries for {n} responses")
        if group_size is not None and (group_size < 1 or n % group_size):
            raise ValueError(f"score: {n} responses do not form whole groups of group_size={group_size}")

        counters: Counter[str] = Counter(responses=n)
        extracted = [extract_answer(r, cfg.answer_marker) for r in responses]
        scores, correct, key_overrides, timed_out = self._correctness(responses, answers, extracted, prompts, extras, counters)
        keys = [normalize_answer(a) if a is not None else None for a in extracted]
        for i, key in key_overrides.items():
            keys[i] = key

        formats = [format_ok(r, self._format) for r in responses]
        rewards = []
        for i in range(n):
            if not formats[i]:
                counters["format_failures"] += 1
                if cfg.format_required:
                    scores[i], correct[i] = cfg.incorrect_reward, False
            rewards.append(scores[i] + (cfg.format_weight if formats[i] else 0.0))
        counters["correct"] = sum(correct)

        cot_ends = []
        for r in responses:
            cot, found = split_at_delimiter(r, cfg.jepo_delimiter)
            cot_ends.append(len(cot) if found else None)
        answer_ids = self._answer_ids(keys, group_size, timed_out, counters) if group_size is not None else None
        for name in ("timeouts", "errors", "no_answer", "no_reference", "format_failures", "answer_key_failures"):
            counters.setdefault(name, 0)
        self.totals.update(counters)
        return RewardResult(
            rewards=rewards,
            correct=correct,
            answers=extracted,
            answer_keys=keys,
            answer_ids=answer_ids,
            format_ok=formats,
            cot_ends=cot_ends,
            counters=dict(counters),
        )

    @property
    def worker_restarts(self) -> int:
        """How many workers were killed and replaced (timeouts and crashes) so far."""
        return self._pool.restarts

    def close(self) -> None:
        """Stop the worker pool."""
        self._pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
