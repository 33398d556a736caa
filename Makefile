# diffprune: `make demo` and `make test` work on a fresh machine from nothing.
#
# TORCH_SPEC is what pip installs when torch is missing. The default is the CPU build that this
# project's machines carry as a local wheel; on a GPU machine use e.g.
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffprune-installed

.PHONY: install demo test test-all bench-speed clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m diffprune.demo --output-dir demo-out

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# the opt-in tests too: torchrun with 2 CPU processes, longer runs
test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

bench-speed: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) demo-out build *.egg-info src/*.egg-info
