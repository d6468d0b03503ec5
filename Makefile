# The two commands of the README: `make demo` (the embedded default end to end) and `make test`.
# Both set up their own virtual environment from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs

.PHONY: setup setup-test demo bench test test-fast lint clean

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
# The embedded default is the paper's recipe on a tiny CLIP pretrained here: caer_jax.pretrain
# exports runs/pretrain_tiny/clip once (a rerun with the same config and data reuses it), then
# zero-shot CLIP with each text type, CLIP-CAER on the face stream alone and on both streams (one
# training per seed, in RUNS/synthetic_tiny{_face,}/seed_S), and the table of all of them. `make
# demo SEEDS=42,43,44` trains three seeds of each (about three times as long) and the report
# prints their mean +- standard deviation.
SEEDS ?= 42
# The CPU runs keep jax off libtpu (installed by setup-test for caer_jax.plan), which would
# otherwise be loaded to look for a TPU and print its warnings about finding none.
demo bench: export JAX_PLATFORMS ?= cpu
TINY := --config=configs/synthetic_tiny.py
demo: setup
	launch/with_jemalloc.sh $(PY) -m caer_jax.pretrain --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
	$(PY) -m caer_jax.eval $(TINY) --zero_shot --workdir=$(RUNS)/zero_shot_descriptors
	$(PY) -m caer_jax.eval $(TINY) --zero_shot --workdir=$(RUNS)/zero_shot_names \
		--config.model.prompt.text_type=class_names
	launch/seeds.sh $(SEEDS) $(RUNS)/synthetic_tiny_face launch/with_jemalloc.sh $(PY) -m caer_jax.train $(TINY):face
	launch/seeds.sh $(SEEDS) $(RUNS)/synthetic_tiny launch/with_jemalloc.sh $(PY) -m caer_jax.train $(TINY)
	$(PY) -m caer_jax.report $(RUNS)/zero_shot_descriptors $(RUNS)/zero_shot_names \
		$(RUNS)/synthetic_tiny_face $(RUNS)/synthetic_tiny

bench: setup
	launch/with_jemalloc.sh $(PY) -m caer_jax.bench --end_to_end --skip_paper --out=$(RUNS)/bench.json

lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two workers, each taking whole test modules (--dist loadscope): a module's fixtures (a training
# run, a built dataset) are then made once, not once per worker.
PYTEST := $(PY) -m pytest -n 2 --dist loadscope --durations=15
test: lint
	$(PYTEST)

# The edit loop: the in-process tests of the library's functions; those marked slow (a command in
# its own process, a training run, a TPU compile) are left out. Their compiled programs are kept
# between runs in .cache/jax-tests (jax's persistent cache, keyed by each program's HLO, the
# compiler and its options, so an edited program compiles again; least recently used entries
# go beyond 2 GB): most of a rerun's programs are loaded instead of compiled. `make test`, what
# CI runs, starts from an empty cache each time.
TEST_CACHE := $(CURDIR)/.cache/jax-tests
test-fast: lint
	mkdir -p $(TEST_CACHE)
	CAER_JAX_TESTS_JAX_CACHE=$(TEST_CACHE) JAX_COMPILATION_CACHE_MAX_SIZE=2000000000 \
		$(PYTEST) -m "not slow"

clean:
	rm -rf $(RUNS) data .cache
