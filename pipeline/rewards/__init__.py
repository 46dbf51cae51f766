"""Rewards: math-verify or custom functions in a timed worker pool, answer keys, JEPO split.

Import-light on purpose (no torch): the pool's fork server imports this package, and a
replacement worker should start in milliseconds.
"""

from pipeline.rewards.answers import extract_answer, extract_boxed, normalize_answer, split_at_delimiter
from pipeline.rewards.keys import class_ids
from pipeline.rewards.pool import TaskOutcome, WorkerPool, resolve_function
from pipeline.rewards.scorer import RewardConfig, RewardResult, RewardScorer
from pipeline.rewards.shaping import format_ok, overlong_penalty

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
    "overlong_penalty",
    "resolve_function",
    "split_at_delimiter",
]
