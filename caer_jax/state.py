"""The training state: exactly the pytree that orbax saves and the train step updates."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from caer_jax import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def create(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
    """Zero face and context clips of the configured geometry (for init and shape inference)."""
    shape = (
        batch_size,
        config.data.num_segments,
        config.data.image_size,
        config.data.image_size,
        3,
    )
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def abstract_params(model: flax.linen.Module, config: ml_collections.ConfigDict) -> Any:
    """Shapes and dtypes of the parameters, without computing or loading any of them."""
    face, context = dummy_inputs(config)
    init = lambda: model.init(jax.random.key(0), face, context, train=False)["params"]
    return jax.eval_shape(init)


def abstract_state(
    model: flax.linen.Module, config: ml_collections.ConfigDict, steps_per_epoch: int
) -> TrainState:
    """ShapeDtypeStructs of the whole state: the restore target of a checkpoint."""
    params = abstract_params(model, config)
    tx = optim.make_optimizer(
        params,
        config.optim,
        steps_per_epoch,
        freeze_image_encoder=config.model.freeze_image_encoder,
    )
    return jax.eval_shape(lambda p: create(p, tx), params)
