from __future__ import annotations

import pytest

from tests.inference.tiny_model import save_tiny_model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama (seed 0) with a character-level tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """The same architecture with different random weights (seed 1): the 'trained' policy."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_step1"), seed=1)
