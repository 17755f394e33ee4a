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

# Speed and scale (docs/RESULTS.md has the recorded figures): speed vs. this machine's ceiling, the default beside
# its peers, int8 vs fp32 scoring, archive-scale scoring in flat memory. ARGS=--quick: a smoke test in about a
# minute (CI runs it); RUNS="RUN..." benchmarks int8 on trained runs (default: a tiny phantom run).
BENCH_OUT ?= runs/bench
bench: $(STAMP)
	$(PY) benchmarks/speed.py --out $(BENCH_OUT)/speed.json $(ARGS)
	$(PY) benchmarks/peers.py --out $(BENCH_OUT)/peers.json $(ARGS)
	$(PY) benchmarks/quant.py --out $(BENCH_OUT)/quant.json $(ARGS) $(if $(RUNS),--runs $(RUNS))
	$(PY) benchmarks/scale.py --out $(BENCH_OUT)/scale.json --images-dir $(BENCH_OUT)/scale-images $(ARGS)

clean:
	rm -rf runs .pytest_cache
