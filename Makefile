# Two entry points: `make run` (main job on the bundled sample data) and `make test`.
# Both create a project-local virtual environment first; nothing is installed globally.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint format bench clean

venv: $(STAMP)

# torch first, at its locked version: from PyPI on Linux that is the CUDA build (it runs on
# CPU too); PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: venv
	$(BIN)/prefpack run

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'  # trl: vs_trl only
	$(BIN)/python -m benchmarks.normalize_curate
	$(BIN)/python -m benchmarks.near_dedup
	$(BIN)/python -m benchmarks.pack
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.lora
	$(BIN)/python -m benchmarks.fsdp_load
	$(BIN)/python -m benchmarks.vs_trl
	$(BIN)/python -m benchmarks.quality

clean:
	rm -rf $(VENV) store .dagster .pytest_cache .ruff_cache .hypothesis
