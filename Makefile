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

# the main job: the plug-and-play ablation (Swin, Twins, EdgeViT vs their HAT conversions) on the built-in
# data set, about 5 minutes on 2 CPU cores; `python -m fastervit.demo` is the FasterViT tour
demo: install
	$(PY) -m recipes.demo

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
