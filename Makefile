# Two commands for a fresh machine:  `make run` (set up, then dvc repro) and
# `make test` (set up, then the test suite). Both create .venv on first use.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint format bench peers bundle verify

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -e '.[dev,team]'
	touch $@

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# Two test processes (pytest-xdist), each taking whole files: most of the suite is
# single-threaded Python (imports, DVC, MLflow) in subprocesses, so two keep both cores busy.
# Files go out in collection order (tests/conftest.py puts the longest first), not
# xdist's default of the files with the most tests first.
# diffusers (the bench extra) too: tests/test_peers.py runs benchmarks/peers.py at a tiny budget.
test: lint
	$(BIN)/python -m pip install --quiet -e '.[dev,team,bench]'
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The house rules, configured in pyproject.toml: ruff's lint and format, mypy's types.
# `make format` rewrites what `ruff format --check` would refuse.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Speed and memory tables (benchmarks/benchmark.py); installs diffusers for the comparison.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/benchmark.py

# Quality per CPU-minute against diffusers' recipe at equal minutes (benchmarks/peers.py):
# budgets 1× and 3× the default run's training, hours on 2 cores. Needs data/dataset and the
# judges in models/ (`dvc repro fetch_data train_evaluator`); writes benchmarks/peers.csv and .json.
peers: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/peers.py --budgets 1,3

# Submission: `make bundle` packs code, params, dvc.lock, reports, checkpoint hashes and the
# environment into submissions/; `make verify BUNDLE=path` reruns it in a temporary folder.
bundle: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/submission.py pack

verify: setup
	@test -n "$(BUNDLE)" || { echo "usage: make verify BUNDLE=submissions/<name>.tar.gz" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/submission.py verify "$(BUNDLE)"
