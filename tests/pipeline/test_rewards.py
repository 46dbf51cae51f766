"""Rewards: answer extraction, answer keys, the JEPO split, the format term, and the timed pool.

The custom reward functions at the top are imported by path inside the worker processes, which
is why they live at module level here.
"""

from __future__ import annotations

import logging
import math
import os
import time

import pytest

from pipeline.rewards import (
    RewardConfig,
    RewardScorer,
    WorkerPool,
    class_ids,
    extract_answer,
    extract_boxed,
    format_ok,
    normalize_answer,
    split_at_delimiter,
)

HERE = __name__
TOWER = "so the answer is \\boxed{9^{9^{9^{9^9}}}}"


def raising_reward(response, answer, *, prompt, extra, **kwargs):
    raise RuntimeError(f"boom on {response!r}")


def hanging_reward(response, answer, *, prompt, extra, **kwargs):
    if response == "hang":
        time.sleep(3600)
    return 1.0


def nan_reward(response, answer, *, prompt, extra, **kwargs):
    return math.nan if response == "nan" else 0.5


def keyed_reward(response, answer, *, prompt, extra, scale=1.0):
    return {"reward": scale * len(response), "answer_key": f"{extra['tag']}|{prompt}"}


def allocating_reward(response, answer, *, prompt, extra, **kwargs):
    return len(bytearray(8 << 30))


def dying_reward(response, answer, *, prompt, extra, **kwargs):
    os._exit(3)


def sleep_then(seconds: float, value: float) -> float:
    time.sleep(seconds)
    return value


def meet(mine: str, peer: str, patience_s: float) -> bool:
    """Leave a mark at `mine`, then wait for `peer`'s: True only if both calls ran at once."""
    open(mine, "w").close()
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        if os.path.exists(peer):
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def math_scorer():
    with RewardScorer(RewardConfig(num_workers=2, timeout_s=2.0, answer_key_mode="math_verify")) as scorer:
        # Both workers started and warm, so timing assertions measure calls, not start-up.
        scorer.score(["\\boxed{1}", "\\boxed{1}"], ["1", "1"])
        yield scorer


def custom_scorer(function: str, timeout_s: float = 20.0, **overrides) -> RewardScorer:
    return RewardScorer(RewardConfig(function=f"{HERE}:{function}", num_workers=2, timeout_s=timeout_s, **overrides))


# --- answer text ---------------------------------------------------------------------------


def test_last_boxed_with_nested_braces():
    assert extract_boxed("first \\boxed{1}, finally \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed 5$") == "5"


def test_unterminated_last_box_is_no_answer():
    assert extract_boxed("\\boxed{3} ... wait, \\boxed{\\frac{1}{") is None


def test_marker_fallback_when_no_box():
    assert extract_answer("work...\nthe FINAL answer is: $42$.\nbye") == "42"
    assert extract_answer("The final answer is 1. Then the final answer is 2.") == "2"
    assert extract_answer("no answer here") is None
    assert extract_answer("The final answer is 3", marker=None) is None
    assert extract_answer("The final answer is 3 \\boxed{4}") == "4"


def test_normalize_answer_only_rewrites_notation():
    assert normalize_answer(" \\dfrac{1}{2}. ") == "\\frac{1}{2}"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("$90^\\circ$") == "90"
    assert normalize_answer("\\text{Paris}") == "Paris"
    assert normalize_answer("0.5") != normalize_answer("\\frac{1}{2}")


def test_jepo_split_at_first_delimiter_case_insensitive():
    text = "Add them. the Final Answer is 5. The final answer is 6."
    cot, found = split_at_delimiter(text)
    assert (cot, found) == ("Add them. the Final Answer is", True)
    assert split_at_delimiter("no delimiter", "ANSWER:") == ("no delimiter", False)
    assert split_at_delimiter("x answer: 3", "ANSWER:") == ("x answer:", True)


def test_format_ok_default_box_or_regex():
    import re

    assert format_ok("so \\boxed{3}")
    assert not format_ok("so 3")
    assert not format_ok("so \\boxed{}")
    assert format_ok("<answer>3</answer>", re.compile(r"<answer>.+</answer>"))
    assert not format_ok("\\boxed{3}", re.compile(r"<answer>.+</answer>"))


def test_class_ids_equal_keys_share_a_class_missing_answers_do_not():
    assert class_ids(["5", "5", None, "3", "5", None]) == [0, 0, 1, 2, 0, 3]
    assert class_ids(["a", "b", "c", "b"], merges=[(0, 2)]) == [0, 1, 0, 1]


# --- math-verify in the pool ---------------------------------------------------------------


def test_math_verify_correct_and_incorrect(math_scorer):
    result = math_scorer.score(
        ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.4}", "The final answer is 1/2.", "no idea"], ["0.5"] * 4
    )
    assert result.rewards == [1.0, 0.0, 1.0, 0.0]
    assert result.correct == [True, False, True, False]
    assert result.answers == ["\\frac{1}{2}", "0.4", "1/2", None]
    assert result.counters["no_answer"] == 1
    assert result.counters["correct"] == 2
    assert result.counters["timeouts"] == result.counters["errors"] == 0


def test_tower_of_exponents_times_out_scores_zero_and_is_counted(math_scorer):
    restarts = math_scorer.worker_restarts
    start = time.monotonic()
    result = math_scorer.score([TOWER, "\\boxed{2}"], ["5", "2"], group_size=2)
    elapsed = time.monotonic() - start
    # One 2 s timeout, not two: the answer-key comparison skips an answer that already hung.
    assert elapsed < 2.0 + 1.9, f"tower of exponents took {elapsed:.1f} s with a 2 s timeout"
    assert result.rewards == [0.0, 1.0]
    assert result.counters["timeouts"] == 1
    assert result.answer_ids == [0, 1]
    assert result.counters["answer_key_failures"] == 0
    assert math_scorer.worker_restarts == restarts + 1
    # The replacement worker serves the next call.
    assert math_scorer.score(["\\boxed{3}"], ["3"]).rewards == [1.0]


def test_answer_ids_group_equal_answers(math_scorer):
    responses = ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{2}", "none", "\\boxed{ 2 }", "\\boxed{1/2}"]
    result = math_scorer.score(responses, ["0.5"] * 6, group_size=3)
    # Group 0: 0.5 and \frac12 are equal by math-verify; group 1 starts over at id 0.
    assert result.answer_ids == [0, 0, 1, 0, 1, 2]
    assert result.answer_keys == ["0.5", "\\frac12", "2", None, "2", "1/2"]


def test_answer_ids_string_mode_needs_equal_strings():
    with RewardScorer(RewardConfig(num_workers=1, answer_key_mode="string")) as scorer:
        result = scorer.score(["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{ 0.5 }"], ["0.5"] * 3, group_size=3)
    assert result.answer_ids == [0, 1, 0]


def test_missing_reference_scores_zero_and_is_counted(math_scorer):
    result = math_scorer.score(["\\boxed{1}"], [None])
    assert result.rewards == [0.0]
    assert result.counters["no_reference"] == 1


def test_cot_ends_mark_the_jepo_delimiter(math_scorer):
    result = math_scorer.score(["Think. The final answer is \\boxed{4}", "\\boxed{4}"], ["4", "4"])
    assert result.cot_ends == [len("Think. The final answer is"), None]


def test_format_bonus_and_format_required():
    config = RewardConfig(num_workers=1, format_weight=0.1, format_required=True)
    with RewardScorer(config) as scorer:
        result = scorer.score(["\\boxed{3}", "\\boxed{4}", "The final answer is 3"], ["3"] * 3)
    # Third: correct by the marker, but format_required zeroes it (and there is no format bonus).
    assert result.rewards == pytest.approx([1.1, 0.1, 0.0])
    assert result.correct == [True, False, False]
    assert result.counters["format_failures"] == 1


# --- custom reward functions ---------------------------------------------------------------


def test_raising_custom_reward_scores_zero_counted_first_traceback_logged(caplog):
    caplog.set_level(logging.ERROR, logger="pipeline.rewards.scorer")
    with custom_scorer("raising_reward") as scorer:
        result = scorer.score(["a", "b", "c"], ["x"] * 3)
        second = scorer.score(["d"], ["x"])
    assert result.rewards == [0.0, 0.0, 0.0]
    assert result.counters["errors"] == 3
    assert second.counters["errors"] == 1
    assert scorer.totals["errors"] == 4
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1, "only the first failure's traceback is logged"
    message = logged[0].getMessage()
    assert "Traceback" in message and "RuntimeError: boom on" in message and "raising_reward" in message


def test_hanging_custom_reward_times_out():
    with custom_scorer("hanging_reward", timeout_s=1.0) as scorer:
        scorer.score(["fine", "fine"], [None, None])
        start = time.monotonic()
        result = scorer.score(["fine", "hang", "fine"], [None] * 3)
        elapsed = time.monotonic() - start
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.counters["timeouts"] == 1
    assert elapsed < 1.0 + 3.0


def test_non_finite_custom_reward_is_an_error():
    with custom_scorer("nan_reward") as scorer:
        result = scorer.score(["nan", "ok"], [None, None])
    assert result.rewards == [0.0, 0.5]
    assert result.counters["errors"] == 1


def test_custom_reward_gets_prompt_extra_kwargs_and_may_set_the_answer_key():
    with custom_scorer("keyed_reward", function_kwargs={"scale": 2.0}) as scorer:
        result = scorer.score(["abc", "de"], [None, None], ["p0", "p1"], extras=[{"tag": "t0"}, {"tag": "t1"}])
    assert result.rewards == [6.0, 4.0]
    assert result.answer_keys == ["t0|p0", "t1|p1"]


def test_worker_memory_limit_turns_a_huge_allocation_into_an_error():
    with custom_scorer("allocating_reward", memory_limit_mb=1024) as scorer:
        result = scorer.score(["x"], [None])
    assert result.rewards == [0.0]
    assert result.counters["errors"] == 1
    assert result.counters["timeouts"] == 0


def test_worker_that_dies_is_counted_and_replaced():
    with custom_scorer("dying_reward") as scorer:
        result = scorer.score(["x", "y"], [None, None])
        assert scorer.worker_restarts == 2
    assert result.rewards == [0.0, 0.0]
    assert result.counters["errors"] == 2


def test_pool_runs_calls_concurrently(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with WorkerPool(2, start_method="forkserver") as pool:
        outcomes = pool.run(f"{HERE}:meet", [((a, b, 30.0), {}), ((b, a, 30.0), {})], timeout_s=60.0)
    assert [o.value for o in outcomes] == [True, True], "two calls on two workers must run at once"


def _forkserver_pid() -> int:
    import multiprocessing.forkserver

    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # noqa: SLF001 - the test needs the process
    assert pid is not None, "the pool did not start a fork server"
    return pid


def test_pool_survives_the_step_wide_sigterm_of_slurm_preemption():
    """`scancel --signal=TERM` signals every process of the trainer's job step, the pool's fork
    server and workers included. The trainer then scores and checkpoints its last step, so the
    pool must come through untouched: same workers, every call answered."""
    import signal

    calls = [((0.0, float(i)), {}) for i in range(4)]
    with WorkerPool(2, start_method="forkserver") as pool:
        pool.run(f"{HERE}:sleep_then", calls, timeout_s=60.0)
        for pid in [_forkserver_pid(), *(w.process.pid for w in pool._workers)]:  # noqa: SLF001
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        outcomes = pool.run(f"{HERE}:sleep_then", calls, timeout_s=60.0)
        assert [o.status for o in outcomes] == ["ok"] * 4, outcomes
        assert pool.restarts == 0


def test_pool_relaunches_a_killed_fork_server():
    """SIGKILL (the OOM killer) cannot be blocked. The fork server's death makes its workers
    look dead too (their exit status came through it), so calls in flight may be lost and are
    reported as crashed, but the pool never raises and its next run is whole again."""
    import signal

    calls = [((0.0, float(i)), {}) for i in range(4)]
    with WorkerPool(2, start_method="forkserver") as pool:
        pool.run(f"{HERE}:sleep_then", calls, timeout_s=60.0)
        os.kill(_forkserver_pid(), signal.SIGKILL)
        os.kill(pool._workers[0].process.pid, signal.SIGKILL)  # noqa: SLF001
        outcomes = pool.run(f"{HERE}:sleep_then", calls, timeout_s=60.0)
        assert {o.status for o in outcomes} <= {"ok", "crashed"}, outcomes
        assert pool.restarts >= 1
        outcomes = pool.run(f"{HERE}:sleep_then", calls, timeout_s=60.0)
        assert [o.value for o in outcomes] == [0.0, 1.0, 2.0, 3.0]


class _FlakyStart:
    """A process whose start() fails like a connection to a dying fork server, `failures` times."""

    def __init__(self, failures: int):
        import signal

        self.failures = failures
        self.calls = 0
        self.blocked_during_start: list[bool] = []
        self._signal = signal

    def start(self):
        self.calls += 1
        self.blocked_during_start.append(self._signal.SIGTERM in self._signal.pthread_sigmask(self._signal.SIG_BLOCK, []))
        if self.calls <= self.failures:
            raise ConnectionRefusedError(111, "Connection refused")


def test_worker_start_blocks_sigterm_retries_a_dying_fork_server_and_restores_the_mask():
    import signal

    from pipeline.rewards.pool import _start_without_sigterm

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    flaky = _FlakyStart(failures=2)
    _start_without_sigterm(flaky)
    assert flaky.calls == 3 and flaky.blocked_during_start == [True] * 3
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    hopeless = _FlakyStart(failures=99)
    with pytest.raises(ConnectionRefusedError):
        _start_without_sigterm(hopeless, attempts=3)
    assert hopeless.calls == 3
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"function": "not_a_path"}, "reward.function"),
        ({"answer_key_mode": "fuzzy"}, "reward.answer_key_mode"),
        ({"start_method": "fork"}, "reward.start_method"),
        ({"timeout_s": 0}, "reward.timeout_s"),
        ({"format_pattern": "("}, "reward.format_pattern"),
        ({"memory_limit_mb": -1}, "reward.memory_limit_mb"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RewardConfig(**overrides).validate()


def test_unimportable_custom_function_fails_at_construction():
    with pytest.raises(ValueError, match=r"reward\.function.*no attribute 'missing'"):
        RewardScorer(RewardConfig(function=f"{HERE}:missing"))


def test_score_rejects_mismatched_lengths_and_partial_groups(math_scorer):
    with pytest.raises(ValueError, match="answers has 1 entries for 2 responses"):
        math_scorer.score(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="whole groups of group_size=2"):
        math_scorer.score(["a", "b", "c"], ["1"] * 3, group_size=2)
