"""The README's two set-up commands work from a clean clone: `make train` (shortened through
the ARGS variable) and `make test` (on one small test file, since this IS the test suite).
Each creates its own .venv in the clone, exactly as on a fresh machine."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None,
                    reason="needs make and git")
def test_make_train_and_make_test_from_a_clean_clone(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    short = ("trainer.steps=2 trainer.warmup_sft_steps=2 eval.every_steps=0 "
             "rollout.prompts_per_step=4 checkpoint.export_hf=true logging.progress_bar=false")
    train = subprocess.run(["make", "train", f"ARGS={short}"], cwd=clone, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert train.returncode == 0, train.stdout[-4000:]
    assert "final step:" in train.stdout
    run = clone / "runs" / "tiny-grpo"
    assert (run / "metrics.jsonl").read_text().count("\n") >= 2
    assert (run / "checkpoints" / "latest").exists()
    assert (run / "hf" / "config.json").exists() and (run / "metrics.png").exists()
    test = subprocess.run(["make", "test", "PYTEST_ARGS=-k tiny_example"], cwd=clone, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert test.returncode == 0, test.stdout[-4000:]
    assert " passed" in test.stdout
