"""The sbatch scripts on a real one-node Slurm (slurm/local-cluster.sh), with the tiny CPU model:
a colocated job completes; a job told to stop (TERM) checkpoints, is requeued and resumes; the
disaggregated layout trains against `groupwise serve` workers behind sglang-router.

Slow (a job is ~1 minute here): deselect with ``-m 'not slurm'``. Skipped only where Slurm
cannot be installed or started (not root, no apt-get, daemons refuse to start).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
TINY = os.path.join(ROOT, "examples", "tiny", "grpo.yaml")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (to install slurm-wlm/munge and run its daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm")
    out = subprocess.run(["bash", CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.skip(f"the local Slurm could not be installed or started: {out.stderr.strip()[-800:]}")
    return True


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def _overrides(assets: str, run_dir: str, steps: int, **more) -> str:
    base = {
        "model.hf_config": os.path.join(assets, "model"),
        "data.paths": f"[{os.path.join(assets, 'train.jsonl')}]",
        "eval.every_steps": 0,
        "trainer.steps": steps,
        "trainer.warmup_sft_steps": 2,
        "logging.run_dir": run_dir,
        "logging.plot": "false",
        "logging.progress_bar": "false",
        "checkpoint.export_hf": "false",
        **more,
    }
    return " ".join(f"{k}={v}" for k, v in base.items())


def submit(script: str, cwd: str, env: dict, *sbatch_args: str) -> str:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, os.path.join(ROOT, "slurm", script)],
                         cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_job(job: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish within {timeout:.0f} s: {job_info(job)}")


def metric_steps(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r["step"] for r in rows if "reward_mean" in r]


def latest(run_dir: str) -> str:
    return open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()


def batch_log(cwd: str, job: str) -> str:
    logs = [f for f in os.listdir(cwd) if f.endswith(f"-{job}.out")]
    return open(os.path.join(cwd, logs[0])).read() if logs else ""


def _cleanup(job: str) -> None:
    if job_info(job).get("JobState") not in FINAL_STATES:
        subprocess.run(["scancel", job])


def run_to_completion(script: str, tmp_path, env: dict) -> tuple[str, dict, str]:
    """Submit `script` on one node with 2 tasks, wait for it, and check it completed with
    exit code 0: (job id, its scontrol record, the batch script's log)."""
    job = submit(script, str(tmp_path), env, "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0")
    try:
        info = wait_job(job, timeout=600)
    finally:
        _cleanup(job)
    log = batch_log(str(tmp_path), job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    return job, info, log


def test_colocated_job_completes_with_metrics_and_checkpoint(cluster, assets, tmp_path):
    run_dir = str(tmp_path / "run")
    env = {"CONFIG": TINY, "OVERRIDES": _overrides(assets, run_dir, 3, **{"checkpoint.every_steps": 2})}
    job, info, log = run_to_completion("colocated.sbatch", tmp_path, env)
    assert info["Restarts"] == "0"
    assert metric_steps(run_dir) == [1, 2, 3]
    assert latest(run_dir) == "step_3"
    assert "finished: checkpoint step 3 of 3" in log
    trainer_log = open(os.path.join(run_dir, "slurm", job, "attempt-0", "trainer.log")).read()
    assert "0: final step:" in trainer_log  # rank-labelled output of the srun trainer step


@pytest.mark.parametrize("how", [["--signal=TERM"], ["--batch", "--signal=TERM"]],
                         ids=["steps", "batch-shell"])
def test_terminated_job_is_requeued_and_resumes(cluster, assets, tmp_path, how):
    """TERM mid-run, either to the job's steps (``scancel --signal=TERM``: the trainer gets it)
    or to the batch shell only (what ``--signal=B:TERM@<s>`` does before the time limit: the
    script forwards it to the trainer step). The trainer checkpoints, the batch script
    requeues the job, and the second attempt resumes from that checkpoint to the end."""
    run_dir = str(tmp_path / "run")
    steps = 12
    env = {"CONFIG": TINY, "OVERRIDES": _overrides(assets, run_dir, steps, **{"checkpoint.every_steps": 0})}
    job = submit("colocated.sbatch", str(tmp_path), env, "--nodes=1", "--ntasks-per-node=2",
                 "--gpus-per-node=0")
    try:
        deadline = time.monotonic() + 400
        while len(metric_steps(run_dir)) < 2:
            assert time.monotonic() < deadline, f"no RL steps logged: {job_info(job)}"
            assert job_info(job).get("JobState") not in FINAL_STATES, batch_log(str(tmp_path), job)
            time.sleep(0.3)
        subprocess.run(["scancel", *how, job], check=True)
        info = wait_job(job, timeout=900)
    finally:
        _cleanup(job)
    log = batch_log(str(tmp_path), job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    first = open(os.path.join(run_dir, "slurm", job, "attempt-0", "trainer.log")).read()
    stopped = int(re.search(r"stopped at checkpoint step (\d+) of 12: requeueing", log).group(1))
    assert 2 <= stopped < steps, first[-3000:]
    # The step-wide TERM reaches the reward workers too; they must score the last step.
    assert "reward worker died" not in first, first[-3000:]
    assert f"SIGTERM: checkpoint at step {stopped} written" in first, first[-3000:]
    resumed = open(os.path.join(run_dir, "slurm", job, "attempt-1", "trainer.log")).read()
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'step_{stopped}')} at step {stopped}" in resumed
    assert metric_steps(run_dir) == list(range(1, steps + 1))  # every step once, none repeated
    assert latest(run_dir) == f"step_{steps}"


def test_disaggregated_job_trains_against_served_workers_behind_the_router(cluster, assets, tmp_path):
    run_dir = str(tmp_path / "run")
    env = {"CONFIG": TINY, "ENGINE": "stand-in", "SERVERS_PER_NODE": "2",
           "OVERRIDES": _overrides(assets, run_dir, 3, **{"checkpoint.every_steps": 0})}
    job, info, log = run_to_completion("disaggregated.sbatch", tmp_path, env)
    assert metric_steps(run_dir) == [1, 2, 3]
    assert latest(run_dir) == "step_3"
    logs = os.path.join(run_dir, "slurm", job, "attempt-0")
    node = socket.gethostname().split(".")[0]
    servers = [f"server-{node}-0.log", f"server-{node}-1.log"]
    assert sorted(f for f in os.listdir(logs) if f.endswith(".log")) == sorted(
        ["router.log", "trainer.log", *servers])
    router = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(logs, "router.log")).read())
    assert "uri=/generate" in router  # generation went through sglang-router
    for name in servers:
        text = open(os.path.join(logs, name)).read()
        # one update after the warm-up plus one per RL step, each announced with its version
        assert "weight version 4" in text, text[-2000:]
    urls = re.search(r"rollout ready: rollout.engine=http rollout.urls=(\[.*?\]) rollout.router_url=(\S+)", log)
    assert urls and len(json.loads(urls.group(1))) == 2
