"""Mesh shapes from config.mesh and the FSDP partition rule."""

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from caer_jax import sharding


def _mesh_config(data, fsdp):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


@pytest.mark.parametrize(
    "data,fsdp,expected", [(-1, 1, (8, 1)), (2, -1, (2, 4)), (1, 8, (1, 8)), (-1, 2, (4, 2))]
)
def test_mesh_shape(data, fsdp, expected):
    assert sharding.mesh_shape(_mesh_config(data, fsdp), 8) == expected
    mesh = sharding.make_mesh(_mesh_config(data, fsdp))
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp")


@pytest.mark.parametrize("data,fsdp", [(3, -1), (-1, -1), (2, 2), (0, 8)])
def test_bad_mesh_is_an_error(data, fsdp):
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.mesh_shape(_mesh_config(data, fsdp), 8)


def test_fsdp_rule():
    assert sharding.leaf_spec((768, 3072), 4) == P(None, "fsdp")
    assert sharding.leaf_spec((3072, 768), 4) == P("fsdp", None)
    assert sharding.leaf_spec((49408, 512), 8) == P("fsdp", None)
    assert sharding.leaf_spec((768,), 4) == P()  # vectors stay replicated
    assert sharding.leaf_spec((16, 16), 4) == P()  # small matrices too
    assert sharding.leaf_spec((1023, 1021), 4) == P()  # nothing divisible
    assert sharding.leaf_spec((768, 3072), 1) == P()


def test_tree_shardings_follow_the_rule():
    mesh = sharding.make_mesh(_mesh_config(2, 4))
    tree = {
        "big": jax.ShapeDtypeStruct((512, 256), "float32"),
        "small": jax.ShapeDtypeStruct((3,), "float32"),
    }
    shardings = sharding.tree_shardings(tree, mesh)
    assert shardings["big"].spec == P("fsdp", None)
    assert shardings["small"].spec == P()
