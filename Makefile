# pacsflow: `make demo` runs the extraction on a demo hospital; `make test` runs lint, types and the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
LINT_PATHS := plugins tests bench dags
QUICK := not orthanc and not postgres and not airflow

.PHONY: demo test test-quick lint bench venv system-deps clean

# requirements-dev.txt = requirements.txt (the exact runtime pins) + the exact pins of pyproject's dev group.
# pacsflow itself is installed with its declared dependencies, constrained to those pins: pip installs nothing
# else, and `pip check` proves the pins satisfy the declared ranges.
$(INSTALLED): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pacsflow needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation -c requirements-dev.txt -e .
	$(PY) -m pip check
	@# The editable build leaves pacsflow.egg-info in plugins/, which Airflow puts on sys.path: every entry point
	@# (the provider, the UI plugin) would be found twice. The installed dist-info is the one to keep.
	rm -rf plugins/pacsflow.egg-info
	@touch $@

venv: $(INSTALLED)

system-deps:
	@bash scripts/install-system-deps.sh

demo: venv
	$(PY) -m pacsflow.demo.run

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# Lint and types first, then every test (all tiers).
test: venv lint system-deps
	$(PY) -m pytest

# The quick tier: no PACS server, no PostgreSQL, no Airflow; under a minute.
test-quick: venv
	$(PY) -m pytest -m "$(QUICK)"

bench: venv system-deps
	$(PY) -m bench

clean:
	rm -rf var .pytest_cache .mypy_cache
