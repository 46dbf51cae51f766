"""The RL loop on the tiny config over gloo: every preset makes a step at TP=2 and at DP=2 and
pushes its weights to the engine; resume equals an uninterrupted run; faults are contained."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ext.multirank import run_ranks

from .trainer_jobs import (faults_job, four_layer_model, one_step_job, overlap_job, presets_job,
                           resume_job, sglang_standin_job)

PRESETS = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "dapo", "gspo", "pods", "copo", "aapo",
           "jepo", "spro"]


@pytest.fixture(scope="module", autouse=True)
def assets():
    from examples.tiny.make_assets import build

    build()


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_every_preset_steps_and_syncs(tmp_path, tp):
    results = run_ranks(presets_job, 2, str(tmp_path), tp, PRESETS, timeout=600)[0]
    assert set(results) == set(PRESETS)
    for name, r in results.items():
        assert r["loss"] is not None and math.isfinite(r["loss"]), (name, r["metrics"])
        assert r["changed"] > 0, f"{name}: the step did not change the weights"
        assert r["synced"], f"{name}: engine weights differ from the trainer's after sync"


# Per-sequence terms (GSPO's sequence ratio, JEPO's answer likelihoods, SPRO's prefix sums)
# are where a context-parallel split could go wrong: each CP rank holds half of every sequence.
CP_PRESETS = ["grpo", "gspo", "jepo", "spro"]


def _same_step(a: dict, b: dict, name: str) -> None:
    """Step metrics `b` (a parallel layout) equal `a` (one rank): same rollout, same loss and
    gradient norm, and a gradient that is not trivially zero."""
    assert a["reward_mean"] == b["reward_mean"], name
    assert abs(a["loss"] - b["loss"]) < 1e-6, (name, a["loss"], b["loss"])
    assert b["grad_norm"] > 1e-3 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"], name


def test_context_parallel_step_equals_single_rank_step(tmp_path):
    # adam_eps=1: the first Adam update is ~lr * g instead of ~lr * sign(g), so weights after
    # the step compare the gradients rather than the sign of float noise on tiny ones.
    common = ["optimizer.adam_eps=1.0"]
    single = run_ranks(one_step_job, 1, str(tmp_path / "one"), common, CP_PRESETS, timeout=300)[0]
    cp2 = run_ranks(one_step_job, 2, str(tmp_path / "cp2"), common + ["parallel.context_parallel=2"],
                    CP_PRESETS, timeout=300)[0]
    for name in CP_PRESETS:
        _same_step(single[name]["metrics"], cp2[name]["metrics"], name)
        diff = max(float((x - y).abs().max())
                   for x, y in zip(single[name]["params"], cp2[name]["params"]))
        assert diff < 1e-7, f"{name}: CP=2 weights differ from single-rank weights by {diff}"


def test_interleaved_pipeline_step_equals_single_rank_step(tmp_path):
    # PP=2 x VPP=2 on a 4-layer model: each rank holds two model chunks (layers 0 and 2, or 1
    # and 3); the step's loss and gradient norm and the weights pushed to the engine must be
    # those of one rank holding the whole model.
    model = four_layer_model(str(tmp_path / "model"))
    common = ["optimizer.adam_eps=1.0", f"model.hf_config={model}"]
    names = ["grpo", "jepo"]
    single = run_ranks(one_step_job, 1, str(tmp_path / "one"), common, names, timeout=300)[0]
    vpp = run_ranks(one_step_job, 2, str(tmp_path / "vpp"),
                    common + ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
                    names, timeout=300)[0]
    for name in names:
        _same_step(single[name]["metrics"], vpp[name]["metrics"], name)
        assert single[name]["synced"] and vpp[name]["synced"], name


def test_resume_equals_uninterrupted_run(tmp_path):
    r = run_ranks(resume_job, 2, str(tmp_path), timeout=600)[0]
    assert r["step"] == 4
    assert r["weight_diff"] == 0.0
    assert r["split"] == r["straight"]


def test_nan_step_is_skipped_and_reward_errors_counted(tmp_path):
    r = run_ranks(faults_job, 1, str(tmp_path), timeout=300)[0]
    assert r["nan_skipped"] == 1 and r["untouched"]
    assert r["moved"] and r["finite_after"]
    assert r["reward_errors"] > 0


def test_sglang_engine_path_with_stand_in_workers_and_router(tmp_path):
    r = run_ranks(sglang_standin_job, 1, str(tmp_path), timeout=300)[0]
    assert r["loss"] is not None and math.isfinite(r["loss"])
    assert r["responses"] > 0
    # Both workers behind the router serve the version the trainer pushed last.
    assert r["versions"] == [str(r["trainer_version"])] * 2 or r["versions"] == [r["trainer_version"]] * 2


def test_one_step_off_policy_overlap_samples_with_weights_one_update_old(tmp_path):
    r = run_ranks(overlap_job, 1, str(tmp_path), timeout=300)[0]
    # Sync before step 0 serves version 1; each step's sync adds one.
    assert r[False]["versions"] == [[1], [2], [3]]
    assert r[True]["versions"] == [[1], [1], [2]]  # step t+1 sampled while step t trained
    assert all(math.isfinite(x) for x in r[True]["losses"])


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config",
                             "examples/tiny/grpo.yaml", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.warmup_sft_steps=0", "eval.every_steps=0", "checkpoint.export_hf=false",
            "logging.plot=false", "logging.progress_bar=false", "rollout.prompts_per_step=4",
            "rollout.n_samples=4", "reward.num_workers=1", f"logging.run_dir={run}"]
    p = _cli(args + ["trainer.steps=200"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.5)
    assert metrics.exists(), p.communicate()[0][-3000:]
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.split("_")[1])
    assert 1 <= stopped < 200
    p2 = _cli(args + [f"trainer.steps={stopped + 1}", "--resume"])
    out2, _ = p2.communicate(timeout=240)
    assert p2.returncode == 0, out2[-3000:]
    assert f"resumed from {run / 'checkpoints' / latest} at step {stopped}" in out2
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped + 2))


def test_bad_dataset_row_names_file_and_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    p = _cli([f"data.paths=[{bad}]", f"logging.run_dir={tmp_path / 'run'}", "trainer.steps=1"])
    out, _ = p.communicate(timeout=240)
    assert p.returncode != 0
    assert "bad.jsonl row 2" in out and "answer" in out  # rows count from 1
