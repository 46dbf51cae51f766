"""TIS turns itself on when the rollout engine and the trainer compute in different precisions
(FP8 on one side only), unless the config says otherwise."""

import logging

import pytest

import pipeline.config as config_mod
from pipeline.config import algorithm_of, load_job_config, precision_mismatch

QWEN7B = "examples/qwen2.5-7b/grpo.yaml"  # bf16 training, SGLang rollout without quantization
FP8_ROLLOUT = "rollout.sglang.extra_args=[--quantization, fp8]"
FP8_TRAINING = "model.fp8=hybrid"


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(config_mod, "_announced", set())


def test_same_precision_keeps_tis_off():
    assert algorithm_of(load_job_config(QWEN7B)).config.tis is None
    both = load_job_config(QWEN7B, [FP8_ROLLOUT, FP8_TRAINING])
    assert precision_mismatch(both) is None
    assert algorithm_of(both).config.tis is None


def test_fp8_rollout_with_bf16_training_turns_tis_on_at_the_default_cap():
    algo = algorithm_of(load_job_config(QWEN7B, [FP8_ROLLOUT]))
    assert (algo.config.tis, algo.config.tis_cap) == ("truncate", 2.0)


def test_w8a8_fp8_quantization_counts_as_fp8_rollout():
    cfg = load_job_config(QWEN7B, ["rollout.sglang.extra_args=[--quantization=w8a8_fp8]"])
    assert algorithm_of(cfg).config.tis == "truncate"


def test_fp8_training_with_bf16_rollout_turns_tis_on():
    cfg = load_job_config(QWEN7B, [FP8_TRAINING])
    assert precision_mismatch(cfg) == ("the trainer runs fp8 (model.fp8=hybrid) and the rollout "
                                       "engine does not (no fp8 --quantization in "
                                       "rollout.sglang.extra_args)")
    assert algorithm_of(cfg).config.tis == "truncate"


def test_fp8_training_with_the_embedded_engine_turns_tis_on():
    """The embedded engine never quantizes."""
    cfg = load_job_config(QWEN7B, [FP8_TRAINING, FP8_ROLLOUT, "rollout.engine=embedded"])
    assert algorithm_of(cfg).config.tis == "truncate"


def test_explicit_null_keeps_tis_off():
    algo = algorithm_of(load_job_config(QWEN7B, [FP8_ROLLOUT, "algorithm.tis=null"]))
    assert algo.config.tis is None


def test_explicit_choice_is_kept_with_its_cap():
    algo = algorithm_of(load_job_config(QWEN7B, [FP8_ROLLOUT, "algorithm.tis=mask",
                                                 "algorithm.tis_cap=3.0"]))
    assert (algo.config.tis, algo.config.tis_cap) == ("mask", 3.0)


def test_a_tis_cap_alone_is_used_by_the_automatic_tis():
    algo = algorithm_of(load_job_config(QWEN7B, [FP8_ROLLOUT, "algorithm.tis_cap=5.0"]))
    assert (algo.config.tis, algo.config.tis_cap) == ("truncate", 5.0)


def test_turning_tis_on_is_logged_once_with_the_reason(caplog):
    cfg = load_job_config(QWEN7B, [FP8_ROLLOUT])
    with caplog.at_level(logging.WARNING, logger="groupwise"):
        algorithm_of(cfg)
        algorithm_of(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "algorithm.tis=truncate (tis_cap 2) turned on: the rollout servers run fp8 (--quantization "
        "fp8 in rollout.sglang.extra_args) and the trainer bf16 (model.fp8: null); set "
        "algorithm.tis: null to keep it off"]
