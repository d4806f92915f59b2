# The two commands of the README, and what they need. `make demo` runs the platform's main job,
# `make test` runs lint, types and the test suite. Both create the virtualenv on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto clean

# The platform alone: what `make demo` needs (the demo must fit in 10 minutes, install included).
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME)

# ... and the test, lint and benchmark tools (TRL among them).
$(STAMP): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(RUNTIME)
	$(VENV)/bin/distill demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) lint
	bash scripts/ensure-redis.sh
	$(PY) -m pytest

proto: $(STAMP)
	$(PY) -m proto.generate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
