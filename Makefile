# make demo: set up, then run the core sweep on the embedded default (tiny model, demo data, CPU)
# make installed: build the wheel, install it in a fresh venv, run a small sweep with `sft-sweep` from an empty folder
# make lint: ruff's check (pinned in the test extra; no reformatting). make test: set up, then run every test (slow ones included); make test-fast skips the slow tier
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# test processes (pytest-xdist): two keep the 2-core CI machine busy while a test waits on a subprocess or a server.
# --dist loadgroup hands out one test at a time (its xdist_group marks do nothing under pytest 9.2: xdist 3.8 sets
# a node id attribute that pytest no longer reads)
TEST_WORKERS ?= 2

.PHONY: setup demo lint test test-fast installed clean

setup: $(VENV)/.installed

# constraints.txt holds the exact versions (pyproject.toml declares ranges): torch first, alone, so that its CPU
# wheel is the one taken; strict editable mode, so that Hydra's plugin scan finds hydra_plugins/ and the
# installed `sft-sweep` command works here too (new modules need `make setup` again; `python train.py` does not)
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[all]' --config-settings editable_mode=strict
	touch $@

demo: setup
	$(PY) train.py -m schedule=under,sweet,over

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

installed:  # the wheel in a fresh venv outside the repo: a sweep and a report with the installed `sft-sweep`
	bash .ci/installed $(PYTHON)

clean:
	rm -rf outputs
