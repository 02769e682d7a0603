# pacsflow: `make demo` runs the extraction on a demo hospital; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench venv system-deps clean

$(INSTALLED): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pacsflow needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@# The editable build leaves pacsflow.egg-info in plugins/, which Airflow puts on sys.path: every entry point
	@# (the provider, the UI plugin) would be found twice. The installed dist-info is the one to keep.
	rm -rf plugins/pacsflow.egg-info
	@touch $@

venv: $(INSTALLED)

system-deps:
	@bash scripts/install-system-deps.sh

demo: venv
	$(PY) -m pacsflow.demo.run

test: venv system-deps
	$(PY) -m pytest

bench: venv system-deps
	$(PY) -m bench

clean:
	rm -rf var .pytest_cache
