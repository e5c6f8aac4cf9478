# The only entry points people need: make demo, make test, make bench, make lint.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint format clean

install: $(STAMP)

# torch and torchvision come from PyPI as a matching pair (pinned in pyproject.toml).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) -m fastervit.demo

test: install
	$(PY) -m pytest -q --doctest-modules hatplug fastervit tests

bench: install
	$(PY) -m hatplug.bench --preset cpu

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check hatplug/layers fastervit

format: install
	$(VENV)/bin/ruff format hatplug/layers fastervit
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
