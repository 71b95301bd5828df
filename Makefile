# Everything the project needs is installed from here, into .venv, from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint typecheck unit sysdeps soak bench bench-gateway bench-neuron bench-control bench-affinity bench-heartbeat bench-fleet clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[neuron,dev]'
	touch $(STAMP)

setup: $(STAMP)

# A local fleet from nothing: the demo model, two neurons and a cortex.
run: setup
	$(BIN)/cortex fleet --dir run

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# Debian tools some tests and benches use (prometheus + promtool, ip netns,
# systemd-analyze, nginx, wrk, headless chromium); best effort: without them
# those tests skip and say why.
SYSDEPS_CMDS := prometheus promtool ip systemd-analyze nginx wrk chromium
SYSDEPS_PKGS := prometheus iproute2 systemd nginx wrk chromium
sysdeps:
	@missing=""; for c in $(SYSDEPS_CMDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing test tools (missing:$$missing): $(SYSDEPS_PKGS)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(SYSDEPS_PKGS) >/dev/null) || echo "apt-get failed; tests needing them skip"; \
	fi

# Two workers, one test file each at a time (a module's shared fleet stays in one).
unit: setup sysdeps
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint typecheck unit

# Minutes of mixed hostile traffic through a real fleet (SOAK_S seconds, default 180).
soak: setup
	$(BIN)/pytest -q -s -m soak tests/e2e/test_soak.py

# Benchmarks: each prints its table with ratios and updates its BENCHMARKS.md section.
# BENCH_ARGS=--quick for a shorter run.
# The gateway hot path against nginx and LiteLLM on fake upstreams (a few minutes).
bench-gateway: setup sysdeps
	$(BIN)/python -m bench.gateway $(BENCH_ARGS)

# The neuron against mlx_lm.server alone on a ~100M-parameter random model (a few minutes).
bench-neuron: setup
	$(BIN)/python -m bench.neuron $(BENCH_ARGS)

# 1,000 nginx fake neurons: poll round, cortex CPU and RSS (/status vs the old calls); routing p99.
bench-control: setup sysdeps
	$(BIN)/python -m bench.control $(BENCH_ARGS)

# Two real replicas, multi-turn chats: cached prompt-token share and TTFT per routing.
bench-affinity: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.affinity $(BENCH_ARGS)

# The runner heartbeat's cost: CPU per GET /health probe; decode tok/s, heartbeat off/1 s/0.05 s (~3 min).
bench-heartbeat: setup
	$(BIN)/python -m bench.heartbeat $(BENCH_ARGS)

# guidellm (the vLLM project's load generator) on the real model: cortex, a neuron and
# mlx_lm.server straight, synchronous and concurrency 4 and 16, one replica and two
# (~15 min). guidellm gets a venv of its own, from the `bench` extra, here only (never
# in setup/test): its sanic would downgrade multidict and click under aiohttp and the
# tests; torch is pinned to the CPU build on this machine's disk (~190 MB, not ~3 GB).
GUIDELLM_VENV := $(VENV)/guidellm
$(GUIDELLM_VENV)/.installed: pyproject.toml
	test -x $(GUIDELLM_VENV)/bin/python || $(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $@

bench-fleet: setup $(GUIDELLM_VENV)/.installed
	$(BIN)/python -m bench.fleet --guidellm $(GUIDELLM_VENV)/bin/guidellm $(BENCH_ARGS)

# All four, one after another (never two at once: 2 cores), each writing its
# BENCHMARKS.md section.
bench: bench-gateway bench-neuron bench-control bench-affinity

clean:
	rm -rf $(VENV) run
