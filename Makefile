# zkv: the verbs. `make run` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SEEDS  ?= 500
ARGS   ?=

.PHONY: browser bench-tools bench-http bench-peers venv run test test-unit test-sim test-process test-containers lint bench bench-failover sim clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint,http]'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

## run: start a local cluster (2 shards x 3 replicas, 1 broker) on tcp://127.0.0.1:5555
run: venv
	$(VENV)/bin/zkv cluster up $(ARGS)

## browser: Debian's chromium for the /ui browser test (installed when missing and root;
## otherwise the test skips with the reason, or fails under CI)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
	    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	    || echo "make browser: could not install chromium"; \
	  else echo "make browser: chromium missing and not root: the browser test will skip"; fi; }

## test: every layer this machine can run (containers need a Docker engine)
test: venv browser
	SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q -p no:cacheprovider tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-sim: venv
	SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q tests/sim

sim: venv
	SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q tests/sim

test-process: venv
	$(PY) -m pytest -q tests/process

lint: venv
	$(VENV)/bin/ruff check zkv protocol broker storage_node client ops gateway tests bench
	$(VENV)/bin/mypy zkv

## bench: zkv vs a bare pyzmq relay of the same shape, as a ratio measured in one run;
## then one request at a time against the relay and one fdatasync (bench/round_trips.py)
bench: venv
	$(PY) -m bench.compare --concurrency 64 $(ARGS)
	$(PY) -m bench.compare --concurrency 256 $(ARGS)
	$(PY) -m bench.round_trips

## bench-tools: wrk (Debian's package) for bench-http, installed when missing and root
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk \
	    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }; \
	  else echo "make bench-tools: wrk missing and not root"; exit 1; fi; }

## bench-http: the gateway vs a FastAPI dict server vs the SDK, one run, same cores
bench-http: venv bench-tools
	$(PY) -m bench.http $(ARGS)

bench-failover: venv
	$(PY) -m bench.failover $(ARGS)

## bench-peers: zkv vs PySyncObj on PySyncObj's benchmark method (~6 min); pysyncobj goes
## into its own .venv-peers, never into zkv's environment
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed:
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q pysyncobj
	touch $@

bench-peers: venv $(PEERS_VENV)/.installed
	$(PY) -m bench.peers --peers-python $(PEERS_VENV)/bin/python $(ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) data .pytest_cache build dist *.egg-info

include mk/containers.mk
