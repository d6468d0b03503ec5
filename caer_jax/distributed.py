"""Joining the processes of a multi-host job through JAX's own runtime.

- Explicit (launch/local.sh, any cluster): JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID in the environment.
- Detected (TPU pods, SLURM): CAER_DISTRIBUTED=auto, set by launch/tpu_pod.sh and
  launch/slurm_gpu.sbatch, lets jax.distributed.initialize() read the cluster's own environment.
- Otherwise a single process: nothing to do.
"""

from __future__ import annotations

import os

import jax
from absl import logging


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
        )
    elif os.environ.get("CAER_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
