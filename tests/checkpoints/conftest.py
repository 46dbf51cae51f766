"""Shared fixtures: tiny HF models per family, and ONE spawned 2-rank job running every
multi-rank check (a spawn costs ~5-10 s here; see tests/checkpoints/jobs.py)."""

import pytest
import torch

from megatron_ext.multirank import run_ranks

from .jobs import SectionFailed, checks_job
from .tiny_models import FAMILIES, make_model, save_model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {fam: save_model(make_model(fam, seed=i), str(root / fam))
            for i, fam in enumerate(FAMILIES)}
    dirs["llama-bf16"] = save_model(make_model("llama", seed=7, dtype=torch.bfloat16),
                                    str(root / "llama-bf16"))
    return dirs


@pytest.fixture(scope="session")
def checks(hf_dirs, tmp_path_factory):
    return run_ranks(checks_job, 2, hf_dirs, str(tmp_path_factory.mktemp("work")), timeout=900)


def section(checks, name: str, rank: int = 0):
    """One section's result on one rank; a section that raised fails the test with its trace."""
    value = checks[rank][name]
    if isinstance(value, SectionFailed):
        pytest.fail(f"job section {name!r} raised on rank {rank}:\n{value}")
    return value
