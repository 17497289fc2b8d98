# moekit: two commands do all set-up.
#   make train   create .venv, install moekit, run the main job
#   make test    create .venv, install moekit with dev extras, run the tests
#   make experiments   run every experiment against its paper's claim, writing docs/results.md
# torch is installed first with TORCH_SPEC (a CPU build where one is on hand). A GPU user
# installs their own torch into .venv first (see README); an importable torch is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: train test lint bench experiments clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.base: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -e ".[dev]"
	touch $@ $(VENV)/.base

train: $(VENV)/.base
	$(PY) -m moekit train $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest $(ARGS)

lint: $(VENV)/.dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: $(VENV)/.dev
	$(PY) -m moekit bench $(ARGS)

experiments: $(VENV)/.base
	$(PY) -m moekit experiment all $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
