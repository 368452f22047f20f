# cdc-pipeline: `make demo` and `make test` are the two commands (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STACK ?= .stack
WAREHOUSE ?= chdb
USERS ?= 150000
ORDERS ?= 20000
PRODUCTS ?= 200
BENCH_ARGS ?=
# `make demo ORDERS_MODE=log`: the orders entity read from a logical replication slot (mode =
# log) instead of polled (incremental); the choice is kept in $(MODE_CFG) until changed again
ORDERS_MODE ?=
MODE_CFG := $(STACK)/orders-mode.cfg
USE_MODE = if [ -n "$(ORDERS_MODE)" ]; then mkdir -p $(STACK) && \
	printf '[entity.orders]\nmode = %s\n' "$(ORDERS_MODE)" > $(MODE_CFG); fi; \
	if [ -f $(MODE_CFG) ]; then export LUIGI_CONFIG_PATH=$(abspath $(MODE_CFG)); fi

LINT_DIRS := $(wildcard pipeline tests setup bench)

.PHONY: demo test unit lint format install system-deps stack-up stack-down summary status report \
	bench clean

$(BIN)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Debian packages the tests need: PostgreSQL 15, ClickHouse server, Chromium (report page test),
# ZooKeeper and a JRE (the local cluster; the zookeeper package brings the jars and slf4j).
system-deps:
	@need=""; \
	[ -x /usr/lib/postgresql/15/bin/initdb ] || need="$$need postgresql"; \
	command -v clickhouse-server >/dev/null || need="$$need clickhouse-server"; \
	[ -f /usr/share/java/zookeeper.jar ] || need="$$need zookeeper"; \
	[ -f /usr/share/java/slf4j-simple.jar ] || need="$$need libslf4j-java"; \
	command -v java >/dev/null || need="$$need default-jre-headless"; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need; \
	fi

lint: install
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix $(LINT_DIRS)
	$(BIN)/ruff format $(LINT_DIRS)

# both layers, unit first (seconds, no server); integration starts its own servers
test: install system-deps lint
	$(BIN)/python -m pytest -q tests/unit tests/integration

# the unit layer alone: no server, no system packages
unit: install
	$(BIN)/python -m pytest -q tests/unit

stack-up: install
	$(BIN)/python -m setup.stack up --root $(STACK) --warehouse $(WAREHOUSE)

stack-down:
	@[ -x $(BIN)/python ] && $(BIN)/python -m setup.stack down --root $(STACK) || true

summary: install
	set -a; source $(STACK)/env; set +a; $(USE_MODE); $(BIN)/python -m pipeline summary

status: install
	set -a; source $(STACK)/env; set +a; $(USE_MODE); $(BIN)/python -m pipeline status

report: install
	set -a; source $(STACK)/env; set +a; $(USE_MODE); $(BIN)/python -m pipeline report --output $(STACK)/report.html
	@echo "open $(STACK)/report.html"

demo: install stack-up
	set -a; source $(STACK)/env; set +a; $(USE_MODE); \
	$(BIN)/python setup/generate_data.py --users $(USERS) --orders $(ORDERS) --products $(PRODUCTS) && \
	$(BIN)/luigi --module pipeline RunAll --scheduler-url "$$LUIGID_URL" && \
	$(BIN)/python -m pipeline summary && \
	echo && echo "luigid UI: $$LUIGID_URL   (stop the stack with: make stack-down)"

bench: install system-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean: stack-down
	rm -rf $(STACK) $(VENV) .pytest_cache .ruff_cache
