"""Test session setup: caches in a directory of the session, 8 fake CPU devices (set before jax
is imported anywhere) and fp32 matmuls.

JAX_PLATFORMS=cpu (inherited by the tests' subprocesses): with libtpu installed (the `tpu` extra,
for caer_jax.plan) jax would otherwise load libtpu in every process to look for a TPU, print its
warnings about the missing TPU and take /tmp/libtpu_lockfile, which parallel workers contend for.
The plan tests still reach the TPU compiler: a compile-only topology does not need that runtime.
"""

import os
import shutil
import tempfile

import pytest
from absl import flags

from caer_jax import backend

# Nothing under the user's ~/.cache: the persistent compilation cache that every training, eval
# or bench process started by a test uses (caer_jax.cli.DEFAULT_COMPILATION_CACHE follows
# XDG_CACHE_HOME), matplotlib's font list and the like go to a directory of this session, which
# subprocesses inherit through the environment and which is removed at the end.
CACHE_HOME = tempfile.mkdtemp(prefix="caer_jax-tests-cache-")
os.environ["XDG_CACHE_HOME"] = CACHE_HOME
# One persistent compilation cache for the session, every program kept however fast it compiled:
# the suite's many small trainings jit the same programs again and again (in one process, each
# run's new jitted functions miss jax's in-memory cache). The xdist workers and the commands the
# tests start inherit it from the process that made it, pytest's controller.
JAX_CACHE = os.environ.get("CAER_JAX_TESTS_JAX_CACHE")
OWNS_JAX_CACHE = JAX_CACHE is None
if OWNS_JAX_CACHE:
    JAX_CACHE = tempfile.mkdtemp(prefix="caer_jax-tests-jax-")
    os.environ["CAER_JAX_TESTS_JAX_CACHE"] = JAX_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# The environment of caer_jax.plan (JAX_PLATFORMS=cpu unless set, libtpu allowed in several
# processes, no metadata-server query): the tests that compile for a TPU in their own process
# (test_traffic) may run in both xdist workers at once; compiling touches no TPU.
backend.prepare_compile_only()

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# The tests run the library outside absl.app, whose flags are then unparsed; grain's worker
# start-up reads one of its flags (caer_jax/data/pipeline.py), and every default is what we want.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """test_pipeline's flat-colour TFDS fixture, built once per session for the pipeline, feature
    cache and damaged-data tests (read only: damage is done to copies)."""
    from test_pipeline import RaerPipelineFixture

    path = tmp_path_factory.mktemp("tfds")
    RaerPipelineFixture(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


def pytest_configure(config):
    import jax  # here, after the environment above is set

    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    shutil.rmtree(CACHE_HOME, ignore_errors=True)
    if OWNS_JAX_CACHE:
        shutil.rmtree(JAX_CACHE, ignore_errors=True)
