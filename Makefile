# `make demo` and `make test` each set up .venv on a fresh clone, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cxr-oneclass demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks research tools
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks research tools

# Training and scoring speed vs. this machine's compute ceiling (ARGS=--quick for a smoke test, --ablate for more).
bench: $(STAMP)
	$(PY) benchmarks/speed.py --out runs/bench/speed.json $(ARGS)

clean:
	rm -rf runs .pytest_cache
