# make demo: set up, then run the core sweep on the embedded default (tiny model, demo data, CPU)
# make lint: ruff's check (pinned in the test extra; no reformatting). make test: set up, then run every test (slow ones included); make test-fast skips the slow tier
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lint test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $@

demo: setup
	$(PY) train.py -m schedule=under,sweet,over

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf outputs
