# The two commands: `make demo` (the pipeline end to end on a local stack) and
# `make test` (lint, types, the test suite on real servers). Both set up what
# they need: Debian packages when missing, the virtual environment at .venv/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck pytest deps venv clean

demo: deps venv
	$(BIN)/python -m devstack.demo

test: deps venv lint typecheck pytest

# Benchmarks against ffmpeg, s5cmd, arq and plain PyAV; results under bench/results/.
bench: deps venv
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	$(BIN)/python -m bench.run

deps:
	@scripts/install-deps.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy edge_agent cloud_ingest shared devstack

pytest: venv
	$(BIN)/pytest -p no:cacheprovider --durations=40

clean:
	rm -rf $(VENV) .stack .mypy_cache .ruff_cache
