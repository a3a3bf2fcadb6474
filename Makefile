# flystage: one entry point for setting up, testing, running and benchmarking.
# `make help` lists the targets.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where the default dataset is read from when it cannot be downloaded.
FLYSTAGE_DATA ?= $(abspath ../shared/data/bdgp-insitu)
export FLYSTAGE_DATA
RUNS ?= runs

.PHONY: help install test demo bench-accuracy bench-preprocess bench-predict

help:
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# ---- set-up and tests -------------------------------------------------------------------

install: ## make the virtual environment .venv with everything (torch, onnxruntime, toolkits)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip 'setuptools<81' wheel
	$(PY) -m pip install -e '.[train,sagemaker,serve,aws,test]'

test: ## run the whole test suite (unit, training, SageMaker contract, containers, control plane)
	$(PY) -m pytest -q -ra

# ---- the package (issue 2) ----------------------------------------------------------------

# ---- benchmarks ---------------------------------------------------------------------------

# ---- images and local mode (issue 3) ------------------------------------------------------

# ---- AWS (issue 4) ------------------------------------------------------------------------
