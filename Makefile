# togather-tasks: the two commands a newcomer runs on a fresh Debian machine, as root:
#   make demo   - install, start the local test bed, deploy the example app to the local Docker engine
#   make test   - install, start the test bed (local + fleet), run the whole suite (unit + e2e)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: install testbed testbed-local testbed-down testbed-fleet testbed-fleet-down demo test test-unit test-e2e bench bench-edge bench-fleet bench-swarm wrk lint clean

$(BIN)/inv: setup.cfg pyproject.toml constraints.txt
	@# A fresh Debian has python3 without venv/ensurepip: install them when missing.
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/inv

# The whole test bed: the local one (Docker, sshd alias togather-testbed, PostgreSQL, dbmate) and
# the fleet of issue 9 (three namespace hosts, registry, load balancer on 127.0.0.1:10080).
testbed: testbed-local
	bash scripts/testbed-fleet.sh

# Only the local parts: what `make demo` needs (it must not wait for the fleet).
testbed-local:
	bash scripts/testbed-up.sh

testbed-down:
	bash scripts/testbed-down.sh

# Kept for habit: the fleet is part of `make testbed` now.
testbed-fleet: testbed

testbed-fleet-down:
	bash scripts/testbed-down.sh --fleet-only

demo: testbed-local install
	bash scripts/demo.sh "$(DEMO_DIR)"

lint: install
	$(BIN)/ruff check .

test-unit: install
	$(BIN)/pytest -q tests/unit

test-e2e: testbed install wrk
	$(BIN)/pytest -q -m e2e tests/e2e

test: testbed install wrk
	$(BIN)/ruff check .
	$(BIN)/pytest -q tests

bench: testbed install bench-edge
	$(BIN)/python bench/zero_downtime.py

# The edge (issue 10): wrk and the load generator with no retries through the proxy during a
# deploy and a rollback, over HTTP and over HTTPS (a throwaway self-signed certificate); then
# sustained throughput direct vs through the proxy over HTTP and HTTPS (60 s each, twice) with
# the TIME_WAIT count in the proxy's network namespace; then the time to obtain a certificate
# from the test bed's Pebble. About fifteen minutes.
bench-edge: testbed install wrk
	$(BIN)/python bench/edge_switch.py
	$(BIN)/python bench/edge_switch.py --scheme https
	$(BIN)/python bench/proxy_throughput.py
	$(BIN)/python bench/acme_obtain.py

wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# The fleet (issue 9): load through the load balancer during a 3-host deploy and rollback, then
# deploy wall time for 1, 2 and 3 hosts, SSH connections, one host's overhead and rollback time.
bench-fleet: testbed install
	$(BIN)/python bench/fleet_zero_downtime.py
	$(BIN)/python bench/fleet_timing.py

# The swarm (issue 12): load through its load balancer (127.0.0.1:11080) during a swarm deploy
# and rollback (0 failed requests is the target), then deploy wall time swarm vs compose fleet
# on the same three hosts.
bench-swarm: testbed install
	$(BIN)/python bench/swarm.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache *.egg-info
