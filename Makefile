# Two entry points on a fresh machine: `make train` (the tiny CPU RL run) and `make test`.
# Both create .venv/ and install what they need; re-running skips the install unless
# pyproject.toml changed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; on a CUDA machine set TORCH="torch" (or leave the one you have installed).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.groupwise-installed
CONFIG ?= examples/tiny/grpo.yaml

.PHONY: train test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

train: $(STAMP)
	$(PY) examples/tiny/make_assets.py
	$(PY) -m pipeline.cli train --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
