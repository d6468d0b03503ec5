"""Joining the processes of a multi-host job through JAX's own runtime.

- Explicit (launch/local.sh, any cluster): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID in the environment.
- Detected (TPU pods, SLURM): CAER_DISTRIBUTED=auto, set by launch/tpu_pod.sh and
  launch/slurm_gpu.sbatch, lets jax.distributed.initialize() read the cluster's own environment.
- Otherwise a single process: nothing to do.

Processes wait for each other at `barrier`s, which go through jax.distributed's coordination
service with a timeout of BARRIER_TIMEOUT_S, never through a collective on the devices: on CPU
the first collective among a set of devices connects them through gloo, which gives up after
30 s (a fixed timeout of XLA's gloo key-value store, no flag changes it), and one host may well
reach that point more than 30 s after another (a slower or busier host compiling the step, one
host reading the compilation cache and another not, process 0 building a dataset alone). So
before the first collective of each program, `compile_together` compiles it on every process
and then waits for all of them.
"""

from __future__ import annotations

import collections
import os
import time

import jax
from absl import logging

# As long as jax.distributed.initialize waits for every process to join. A process that dies
# ends the wait sooner: the coordination service then fails the barrier.
BARRIER_TIMEOUT_S = 300
# Test hook: "POINT:PROCESS:SECONDS" makes that process reach compile_together(POINT) late.
LATE_ENV = "CAER_TEST_LATE_PROCESS"
_barrier_counts: collections.Counter = collections.Counter()


def initialize() -> None:
    """Initialises jax.distributed when the environment describes a multi-process job."""
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # Cross-process collectives on CPU need gloo (the default implementation has none).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise OSError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            initialization_timeout=BARRIER_TIMEOUT_S,
        )
    elif os.environ.get("CAER_DISTRIBUTED") == "auto":
        jax.distributed.initialize(initialization_timeout=BARRIER_TIMEOUT_S)
    else:
        return
    logging.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def barrier(name: str) -> None:
    """Returns once every process has called barrier(name) (at most BARRIER_TIMEOUT_S later);
    at once with a single process. Every process must call barrier(name) as often as the others
    (the call's count makes its key unique, as the coordination service wants)."""
    _barrier_counts[name] += 1
    key = f"caer_jax.{name}.{_barrier_counts[name]}"
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=key, timeout_ms=BARRIER_TIMEOUT_S * 1000)


def compile_together(name: str, jitted, *args) -> None:
    """Compiles `jitted` for `args` (the call that follows reuses the program), then waits at a
    barrier for every process to have done the same, so that the program's first collective
    finds every process there. With a single process nothing (the first call compiles)."""
    if jax.process_count() == 1:
        return
    jitted.lower(*args).compile()
    late = os.environ.get(LATE_ENV, "").split(":")
    if late[0] == name and int(late[1]) == jax.process_index():
        logging.warning("%s: process %s arrives %s s late (test hook)", name, late[1], late[2])
        time.sleep(float(late[2]))
    barrier(name)
