# The two commands of the README: `make demo` (the embedded default end to end) and `make test`.
# Both set up their own virtual environment from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs

.PHONY: setup setup-test demo bench test lint clean

# torch is pinned to the CPU wheel before the extras are installed, so that nothing pulls a CUDA build.
$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[build]"
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[build,torch,test,tpu]"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

# CPU runs go through launch/with_jemalloc.sh (jemalloc keeping freed pages when it is installed).
# One training per seed and stream setting, in RUNS/synthetic_tiny{,_face}/seed_S; `make demo
# SEEDS=42,43,44` trains three seeds of each (about three times as long) and the report prints
# their mean +- standard deviation.
SEEDS ?= 42
# The CPU runs keep jax off libtpu (installed by setup-test for caer_jax.plan), which would
# otherwise be loaded to look for a TPU and print its warnings about finding none.
demo bench: export JAX_PLATFORMS ?= cpu
demo: setup
	launch/seeds.sh $(SEEDS) $(RUNS)/synthetic_tiny launch/with_jemalloc.sh $(PY) -m caer_jax.train --config=configs/synthetic_tiny.py
	launch/seeds.sh $(SEEDS) $(RUNS)/synthetic_tiny_face launch/with_jemalloc.sh $(PY) -m caer_jax.train --config=configs/synthetic_tiny.py:face
	$(PY) -m caer_jax.report $(RUNS)/synthetic_tiny $(RUNS)/synthetic_tiny_face

bench: setup
	launch/with_jemalloc.sh $(PY) -m caer_jax.bench --end_to_end --skip_paper --out=$(RUNS)/bench.json

lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2 --durations=15

clean:
	rm -rf $(RUNS) data
