# The two commands: `make demo` and `make test`. Each sets up everything it needs, idempotently:
# system packages, tracefs, kernel headers for BCC (leakhunt doctor --install), a venv with torch
# pinned *before* the project (an unpinned torch is a multi-gigabyte CUDA build), the project.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean leakers gpu-wheels gpu-check

# What the tests and benchmarks need from the OS besides leakhunt's own backends: a real libucm
# (UCX) to test against; strace, perf and BCC's memleak (bpfcc-tools) as benchmark peers; Debian's
# jemalloc and mimalloc for the page-fault tests (an application library above a real allocator).
TEST_PACKAGES := libucx0 libucx-dev strace linux-perf bpfcc-tools libjemalloc-dev libmimalloc-dev

setup: $(STAMP)
	$(BIN)/leakhunt doctor --install --quiet $(addprefix --with ,$(TEST_PACKAGES))

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e '.[refserver,dev]'
	touch $@

leakers:
	$(MAKE) -C fixtures/leakers

demo: setup leakers
	$(BIN)/leakhunt demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup leakers lint
	$(BIN)/pytest -q --durations=20

bench: setup leakers
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) fixtures/leakers/build build *.egg-info

# The GPU checks (docs/gpu.md). gpu-wheels runs here, with network: the wheels the GPU machine's
# Python 3.12 lacks, into $(GPU_WHEELS)/ (git-ignored; carry it). gpu-check runs there, offline,
# with that machine's own python3 (its torch and CUDA): nothing else is needed.
GPU_WHEELS ?= gpu-wheels
GPU_PYTHON ?= python3
GPU_CHECKS ?= all

gpu-wheels:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_wheels.py --dest $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py --wheels $(GPU_WHEELS) --checks $(GPU_CHECKS)
