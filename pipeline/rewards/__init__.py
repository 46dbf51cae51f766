"""Rewards: math-verify or custom functions in a timed worker pool, answer keys, JEPO split.

DAPO's overlong length shaping is applied by `pipeline.algorithms` (from the response mask),
not here, so it can never be added twice.

Import-light on purpose (no torch): the pool's fork server imports this package, and a
replacement worker should start in milliseconds.
"""

from pipeline.rewards.answers import (
    extract_answer,
    extract_boxed,
    format_ok,
    normalize_answer,
    split_at_delimiter,
)
from pipeline.rewards.keys import class_ids
from pipeline.rewards.pool import TaskOutcome, WorkerPool, resolve_function
from pipeline.rewards.scorer import RewardConfig, RewardResult, RewardScorer

__all__ = [
    "RewardConfig",
    "RewardResult",
    "RewardScorer",
    "TaskOutcome",
    "WorkerPool",
    "class_ids",
    "extract_answer",
    "extract_boxed",
    "format_ok",
    "normalize_answer",
    "resolve_function",
    "split_at_delimiter",
]
