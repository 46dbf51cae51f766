"""Custom reward functions for trainer tests (imported by path in the reward workers).

A random tiny model never adds numbers correctly, so these give every group reward variance
from properties of the text alone.
"""


def digit_reward(response, answer, *, prompt=None, extra=None):
    """Fraction of characters that are the digit '1' (varies across samples)."""
    return sum(ch == "1" for ch in response) / max(len(response), 1)


def flaky_reward(response, answer, *, prompt=None, extra=None):
    """Raises on responses containing '7' (the trainer must score them 0 and count them)."""
    if "7" in response:
        raise RuntimeError("flaky reward: refusing a 7")
    return digit_reward(response, answer)
