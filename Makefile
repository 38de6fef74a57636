# segx: run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Keras, TensorFlow and matplotlib write caches under $HOME; keep them inside the project.
export KERAS_HOME ?= $(CURDIR)/outputs/.keras
export MPLCONFIGDIR ?= $(CURDIR)/outputs/.matplotlib
export PYTHONUNBUFFERED := 1

.PHONY: help install ensemble demo train export ui server test test-random test-slow test-all bench bench-quick lint format slurm-local test-slurm clean clean-all

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install segx with its pinned dependencies

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,hparams]"
	@rm -f $(VENV)/.installed-*; touch $@

ensemble: install  ## train the default members on synthetic data if missing, search the ensemble, print the table
	$(PY) -m segx.ensemble ensemble.train_missing=true $(ARGS)

demo: ensemble  ## same as `make ensemble`

train: install  ## train one member: make train ARGS="backbone=resnet34"
	$(PY) -m segx.train $(ARGS)

export: install  ## export an ensemble as one model: make export ARGS="ensemble_run_id=<id> format=onnx" (or savedmodel)
	$(PY) -m segx.export $(ARGS)

ui:  ## MLflow UI for outputs/mlflow.db on http://127.0.0.1:5000, opening experiments on their runs (one worker: experiments/ui_memory)
	@$(PY) -c "from segx.tracking import ui_urls; print(ui_urls('sqlite:///outputs/mlflow.db', 'http://127.0.0.1:5000'))"
	$(PY) -m mlflow ui --app-name segx --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

server: install  ## shared MLflow tracking server (PostgreSQL, proxied artifacts) on http://127.0.0.1:5001: make server ARGS="port=5002"
	$(PY) -m segx.server $(ARGS)

# Every test's duration, kept (JUnit XML: name and seconds per test); the 15 slowest are printed.
TEST_REPORT ?= outputs/tests/fast.xml

test: install  ## the layer contracts and the formatter, then the fast tests (real TF models, real MLflow store in tmp)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check segx tests experiments
	$(VENV)/bin/ruff format --check segx tests experiments
	rm -f $(TEST_REPORT); status=0; $(PY) -m pytest -m "not slow" -q -p no:randomly --junitxml=$(TEST_REPORT) || status=$$?; \
	  [ ! -f $(TEST_REPORT) ] || $(PY) experiments/layout/test_durations.py $(TEST_REPORT) --slowest 15; exit $$status

test-random: install  ## the fast tests in a random order (pytest-randomly; it prints the seed, ARGS="--randomly-seed=N" repeats one)
	$(PY) -m pytest -m "not slow" --durations=15 $(ARGS)

test-slow: install  ## slow tests only (every backbone builds, benchmark smoke test)
	$(PY) -m pytest -m slow -q

test-all: install  ## every test
	$(PY) -m pytest -q

bench: install  ## the DSB2018 study (about an hour on 2 CPU cores): experiments/dsb2018/RESULTS.md
	$(PY) -m segx.bench $(ARGS)

bench-quick: install  ## every benchmark stage on a small subset (minutes)
	$(PY) -m segx.bench profile=quick $(ARGS)

lint: install  ## ruff (lint and format check) and the layer contracts (import-linter, pyproject.toml)
	$(VENV)/bin/ruff check segx tests experiments
	$(VENV)/bin/ruff format --check segx tests experiments
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff format segx tests experiments

slurm-local:  ## start a one-node SLURM (root; Debian slurm-wlm + munge) for the SLURM sweep test
	bash scripts/slurm-local.sh start

test-slurm: install slurm-local  ## the real SLURM sweep (2 backbones x 2 folds, a preempted job requeued, shared server, ensemble); log in experiments/scaleout/
	$(PY) -m pytest -q -m slow tests/test_slurm.py

clean:  ## remove what segx can rebuild (decoded and probability caches, Hydra logs, generated data); keeps runs, splits, checkpoints
	rm -rf outputs/cache outputs/hydra data/synthetic multirun
	@echo "kept: outputs/mlflow.db, outputs/mlartifacts, outputs/splits, outputs/checkpoints (make clean-all removes them, after asking)"

clean-all:  ## remove outputs/ entirely: every MLflow run, model and split (asks first)
	@echo "This deletes every recorded run, model, split and checkpoint:"; du -sh outputs/* 2>/dev/null || true
	@read -p "Type 'delete' to remove outputs/: " answer && [ "$$answer" = delete ] && rm -rf outputs/* data/synthetic multirun && echo removed || echo "nothing removed"
