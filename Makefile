# The two commands a new user needs: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv/ and installs the CPU stack first if it is missing (scripts/setup_env.sh).
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny_cpu.yaml

.PHONY: venv demo test test-all test-fast lint format typecheck bench clean

venv:
	@bash scripts/setup_env.sh

demo: venv
	$(VENV)/bin/qrl-train $(CONFIG) $(ARGS)

test: venv
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-all: venv
	QRL_TEST_ALL_FORMATS=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest tests -q -m "unit" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf runs .pytest_cache
