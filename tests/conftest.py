"""Test session setup: 8 fake CPU devices (set before jax is imported anywhere) and fp32 matmuls.

JAX_PLATFORMS=cpu (inherited by the tests' subprocesses): with libtpu installed (the `tpu` extra,
for caer_jax.plan) jax would otherwise load libtpu in every process to look for a TPU, print its
warnings about the missing TPU and take /tmp/libtpu_lockfile, which parallel workers contend for.
The plan tests still reach the TPU compiler: a compile-only topology does not need that runtime.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
