# togather-tasks: the two commands a newcomer runs on a fresh Debian machine, as root:
#   make demo   - install, start the test bed, deploy the example app to the local Docker engine
#   make test   - install, start the test bed, run the whole suite (unit + end to end)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install testbed testbed-down demo test test-unit test-e2e bench lint clean

$(BIN)/inv: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/inv

testbed:
	bash scripts/testbed-up.sh

testbed-down:
	bash scripts/testbed-down.sh

demo: install testbed
	bash scripts/demo.sh "$(DEMO_DIR)"

lint: install
	$(BIN)/ruff check .

test-unit: install
	$(BIN)/pytest -q tests/unit

test-e2e: install testbed
	$(BIN)/pytest -q -m e2e tests/e2e

test: install testbed
	$(BIN)/ruff check .
	$(BIN)/pytest -q tests

bench: install testbed
	$(BIN)/python bench/zero_downtime.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache *.egg-info
