# `make run` and `make test` do all the set-up on a fresh machine: they create .venv with
# Python 3.11 and install signgate (with its dev extras) into it first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PostgreSQL for the second test run; skipped (with a notice) when none answers there,
# unless REQUIRE_PG=1.
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres
REQUIRE_PG ?= 0
# Extra options for `signgate dev`, e.g. make run DEV_ARGS="--headless --api-port 8080"
DEV_ARGS ?=

.PHONY: venv run test lint test-sqlite test-postgresql bench clean distclean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

run: venv
	$(BIN)/signgate dev $(DEV_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy .

# One recipe, so the steps run in this order even under `make -j`.
test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/pytest -q
	@$(MAKE) --no-print-directory test-postgresql

test-sqlite: venv
	$(BIN)/pytest -q

test-postgresql: venv
	@if SIGNGATE_TEST_PG_URL='$(PG_URL)' $(BIN)/python -c "import os, psycopg; \
		psycopg.connect(os.environ['SIGNGATE_TEST_PG_URL'].replace('+psycopg', ''), connect_timeout=3).close()" \
		2>/dev/null; then \
		echo "SIGNGATE_TEST_DB=postgresql $(BIN)/pytest -q"; \
		SIGNGATE_TEST_DB=postgresql SIGNGATE_TEST_PG_URL='$(PG_URL)' $(BIN)/pytest -q; \
	elif [ "$(REQUIRE_PG)" = 1 ]; then \
		echo "no PostgreSQL answers at $(PG_URL) and REQUIRE_PG=1" >&2; exit 1; \
	else \
		echo "*** skipping the PostgreSQL run: no server answers at $(PG_URL)"; \
	fi

bench: venv
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtualenv (not .signgate: it holds the dev master key and data).
distclean: clean
	rm -rf $(VENV)
