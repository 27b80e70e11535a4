# tidings — developer entry points. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 6464
DATA   ?= ./tidings-data
PYTEST_ARGS ?=

.PHONY: help install run test test-slow soak fuzz lint typecheck fmt check bench bench-quick bench-peers clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install tidings with its dev extras (editable)

run: $(STAMP) ## start the broker in the foreground on $(HOST):$(PORT), data in $(DATA)
	$(BIN)/tidings-broker --host $(HOST) --port $(PORT) --data-dir $(DATA)

test: $(STAMP) ## run the test suite (T1 tier)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP) ## the suite with the Hypothesis "ci" profile (more examples)
	$(BIN)/python -m pytest --hypothesis-profile=ci $(PYTEST_ARGS)

soak: $(STAMP) ## the soak tier (T2): long crash, churn and hostile-client runs
	TIDINGS_SOAK=1 TIDINGS_TEST_TIMEOUT=1800 $(BIN)/python -m pytest --hypothesis-profile=ci $(PYTEST_ARGS)

FUZZ_SECONDS ?= 600
fuzz: $(STAMP) ## coverage-guided fuzzing (T2, atheris): each target FUZZ_SECONDS (600); finds go to tests/fuzz/corpus
	$(BIN)/python -m pip install -q -e '.[dev,fuzz]'
	for target in decoder session session-users recovery; do $(BIN)/python -m tests.fuzz $$target --seconds $(FUZZ_SECONDS) || exit 1; done

lint: $(STAMP) ## ruff + mypy
	$(BIN)/ruff check protocol broker client bench tests
	$(BIN)/ruff format --check protocol broker client bench tests
	$(BIN)/mypy protocol broker client bench

typecheck: $(STAMP) ## mypy only
	$(BIN)/mypy protocol broker client bench

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format protocol broker client bench tests
	$(BIN)/ruff check --fix protocol broker client bench tests

check: lint test ## lint, typecheck and test, in that order

bench: $(STAMP) ## run every benchmark scenario against tidings
	$(BIN)/python -m bench

bench-quick: $(STAMP) ## a smoke run of every scenario (< 1 minute)
	$(BIN)/python -m bench --quick

bench-peers: $(STAMP) ## install Redis, NATS, RabbitMQ (apt) and their clients, then benchmark side by side
	command -v redis-server >/dev/null && command -v nats-server >/dev/null && test -x /usr/lib/rabbitmq/bin/rabbitmq-server || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server nats-server rabbitmq-server)
	$(BIN)/python -m pip install -q -e '.[bench,peers]'
	$(BIN)/python -m bench --peers --chart

clean: ## remove the virtual environment and caches (keeps tidings-data)
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis build *.egg-info
