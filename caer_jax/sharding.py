"""Device mesh and partitioning: batches over ("data", "fsdp"), large weights over "fsdp".

The rule is a function of a leaf's shape alone, so the same call gives the shardings of the
parameters and of every optimizer-state tree that mirrors them (momentum, Adam moments).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caer_jax import errors

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: sharding them saves nothing and costs collectives.
MIN_FSDP_SIZE = 2**14


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """Resolves config.mesh (sizes, at most one -1) against the number of devices."""
    sizes = [mesh_config.data, mesh_config.fsdp]
    if sizes.count(-1) > 1:
        raise errors.BadInputError(
            f"config.mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]}"
        )
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise errors.BadInputError(
            f"config.mesh: data={sizes[0]} fsdp={sizes[1]} does not divide {num_devices} devices"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise errors.BadInputError(
            f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} != {num_devices} devices"
        )
    return sizes[0], sizes[1]


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over all devices of all processes (or `devices`), in the order
    jax.make_mesh gives them: on TPU slices, neighbours on the chips' torus are neighbours on
    the mesh's axes. Axes are Auto: shardings are given, not carried by types."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 (the clip axis) split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def traced_for(mesh: Mesh, fn: Callable) -> Callable:
    """`fn`, traced with `mesh` as the context's abstract mesh: to be jitted for that mesh. The
    model's Pallas kernels (models/attention.py) read it to run per device under shard_map,
    since XLA's partitioner cannot split a Mosaic kernel."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """FSDP rule: shard the largest dimension divisible by the fsdp size of a large leaf."""
    if fsdp_size == 1 or len(shape) < 2 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the FSDP rule."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_spec(tuple(getattr(leaf, "shape", ())), fsdp_size)),
        tree,
    )
