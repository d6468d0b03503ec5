"""The jitted train step on its own: dropout draws from the step's key, and a step whose loss or
gradient is not finite leaves parameters and optimizer state as they were.

One device, no input pipeline: a tiny CLIP-CAER (32 px, 2 frames, one layer per CLIP tower) on
fixed random clips.
"""

import functools
import re

import flax
import jax
import numpy as np
import pytest

from caer_jax import hlo, optim, steps
from caer_jax import state as state_lib
from caer_jax.models import caer
from configs import synthetic_tiny

BATCH = 4


def tiny_config():
    c = synthetic_tiny.get_config("scratch")
    c.data.num_segments = 2
    c.data.image_size = 32
    c.model.clip.image_size = 32
    c.model.clip.vision_layers = 1
    c.model.clip.text_layers = 1
    # A text width of its own: the text MLP's kernels [48, 192] and [192, 48] are then the only
    # parameters of those shapes, and a dot of the compiled step producing one of them is a
    # weight gradient (test_the_compiled_step_has_no_weight_gradient_of_the_frozen_text_encoder).
    c.model.clip.text_width = 48
    return c


@functools.cache
def model_and_params():
    config = tiny_config()
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    return model, jax.device_get(caer.init_params(model, config.model, jax.random.key(0)))


def random_batch(seed: int) -> dict:
    config = tiny_config()
    rng = np.random.default_rng(seed)
    shape = (BATCH, config.data.num_segments, config.data.image_size, config.data.image_size, 3)
    return {
        "face": rng.random(shape, np.float32),
        "context": rng.random(shape, np.float32),
        "label": rng.integers(0, 5, BATCH).astype(np.int32),
    }


def train_step(optim_config, grad_accum_steps: int = 1):
    """A fresh state and steps.train_step jitted as f(state, batch, dropout_rng), without
    donation (the tests keep old states)."""
    model, params = model_and_params()
    tx = optim.make_optimizer(params, optim_config, steps_per_epoch=4)

    @jax.jit
    def step_fn(state, batch, dropout_rng):
        return steps.train_step(
            state,
            batch,
            model=model,
            tx=tx,
            dropout_rng=dropout_rng,
            streams="both",
            grad_accum_steps=grad_accum_steps,
        )

    return state_lib.create(params, tx), step_fn


@functools.cache
def default_train_step():
    """train_step of the tiny config's optimizer, compiled once for the tests that share it."""
    return train_step(tiny_config().optim)


def test_the_train_step_draws_dropout_from_its_key():
    assert tiny_config().model.temporal.dropout > 0
    state, step_fn = default_train_step()
    batch = random_batch(0)
    losses = {}
    for seed in (0, 0, 1):
        _, metrics = step_fn(state, batch, jax.random.key(seed))
        losses.setdefault(seed, []).append(float(metrics["loss"]))
    print("losses by dropout key:", losses)
    assert losses[0][0] == losses[0][1]
    assert abs(losses[0][0] - losses[1][0]) > 1e-3


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_a_nonfinite_step_leaves_parameters_and_optimizer_state_as_they_were(grad_accum_steps):
    # A finite step first (so that the optimizer state is not its initial one), then a step
    # from parameters scaled to ~1e30, as a diverging run reaches them (tests/test_faults.py gets
    # there with a learning rate of 1e30): their forward pass overflows.
    state, step_fn = (
        default_train_step()
        if grad_accum_steps == 1
        else train_step(tiny_config().optim, grad_accum_steps=grad_accum_steps)
    )
    first, metrics = step_fn(state, random_batch(0), jax.random.key(0))
    assert bool(metrics["finite"])
    first = jax.device_get(first)
    huge = first.replace(params=jax.tree.map(lambda p: p * np.float32(1e30), first.params))

    second, metrics = step_fn(huge, random_batch(1), jax.random.key(0))
    metrics = jax.device_get(metrics)
    assert not metrics["finite"]
    assert not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])), metrics
    second = jax.device_get(second)
    # the step counter advances (it stays aligned with the data); nothing else changes
    assert (int(first.step), int(second.step)) == (1, 2)
    jax.tree.map(np.testing.assert_array_equal, second.params, huge.params)
    jax.tree.map(np.testing.assert_array_equal, second.opt_state, huge.opt_state)


def test_the_step_differentiates_and_updates_only_the_trainable_parameters():
    # grad_norm is the norm of the trainable parameters' gradients: the frozen text encoder's
    # weights get none (their gradient, which the prompts' path would give them, is not computed)
    # and come back as they went in.
    model, params = model_and_params()
    state, step_fn = default_train_step()
    batch = random_batch(0)
    new, metrics = step_fn(state, batch, jax.random.key(3))

    def loss(p):
        logits, _ = model.apply(
            {"params": p},
            batch["face"],
            batch["context"],
            train=True,
            rngs={"dropout": jax.random.fold_in(jax.random.key(3), 0)},
        )
        return steps.cross_entropy(logits, batch["label"])

    grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
    groups = optim.flat_groups(params)
    norm = lambda keys: float(np.sqrt(sum(float(np.sum(np.square(grads[k]))) for k in keys)))
    trainable = [k for k in grads if groups[k] != optim.FROZEN]
    assert norm(grads) > 1.001 * norm(trainable)  # the frozen weights would have gradients
    assert float(metrics["grad_norm"]) == pytest.approx(norm(trainable), rel=1e-4)
    jax.tree.map(np.testing.assert_array_equal, new.params["text_encoder"], params["text_encoder"])


@functools.cache
def _compiled_step_hlo() -> hlo.Module:
    """The optimized HLO of the tiny config's train step: the program the tests above run."""
    state, step_fn = default_train_step()
    compiled = step_fn.lower(state, random_batch(0), jax.random.key(0)).compile()
    return hlo.Module.parse(compiled.as_text())


def test_the_compiled_step_has_no_weight_gradient_of_the_frozen_text_encoder():
    module = _compiled_step_hlo()
    dots = [i for insts in module.computations.values() for i in insts if i.opcode == "dot"]
    shapes = [re.match(r"f32\[([\d,]*)\]", d.shape).group(1) for d in dots]
    # the image encoder's MLP kernel gradient is there: the check reads weight gradients
    assert {"64,256", "256,64"} & set(shapes), shapes
    assert not [s for s in shapes if s in ("48,192", "192,48")], shapes


def test_a_skipped_step_is_a_conditional_not_a_select_over_the_parameters():
    # The update runs under lax.cond: parameters and momentum are written once, in place; a
    # select between old and new values would read both and write a third copy of each.
    module = _compiled_step_hlo()
    kinds = [i.opcode for insts in module.computations.values() for i in insts]
    assert "conditional" in kinds
    kernel = "f32[64,256]"  # the image encoder's MLP kernel
    selects = [
        i
        for insts in module.computations.values()
        for i in insts
        if i.opcode == "select" and i.shape.startswith(kernel)
    ]
    assert not selects
