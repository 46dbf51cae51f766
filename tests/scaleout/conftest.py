import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: submits jobs to a local one-node Slurm (slow; deselect with -m 'not slurm')")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The tiny example's tokenizer, model and data, built fresh (nothing downloaded)."""
    sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
    from make_assets import build

    return build(str(tmp_path_factory.mktemp("tiny-assets")))
