"""The pure, jit-able steps: CLIP-CAER's training (with accumulation) and evaluation, and CLIP's
contrastive pretraining.

Module-level functions with keyword-only dependencies, so that the training loop, the evaluator,
the benchmark and the tests jit the same code with their own shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from caer_jax import optim
from caer_jax import state as state_lib
from caer_jax.models import caer, contrastive


def stream_inputs(batch: dict, streams: str) -> tuple[Any, Any]:
    """The (face, context) clips a model of `streams` consumes; the other one is None."""
    face = batch["face"] if streams in ("face", "both") else None
    context = batch["context"] if streams in ("context", "both") else None
    return face, context


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def micro_batches(batch: dict, grad_accum_steps: int) -> dict:
    """[B, ...] -> [A, B / A, ...]: micro-batch i holds rows i, i + A, i + 2A, ... of the batch.

    Strided rather than contiguous, so that every device's block of rows (the batch is split
    over the mesh along dim 0) feeds every micro-batch and no rows move between devices.
    """
    size = next(iter(batch.values())).shape[0]
    if size % grad_accum_steps:
        raise ValueError(
            f"config.train.grad_accum_steps={grad_accum_steps} does not divide the global "
            f"batch of {size} clips"
        )
    split = lambda x: x.reshape(size // grad_accum_steps, grad_accum_steps, *x.shape[1:])
    return jax.tree.map(lambda x: jnp.swapaxes(split(x), 0, 1), batch)


def train_step(
    state: state_lib.TrainState,
    batch: dict,
    dropout_rng: jax.Array,
    *,
    model,
    tx: optax.GradientTransformation,
    streams: str,
    grad_accum_steps: int = 1,
    method: str | None = None,
) -> tuple[state_lib.TrainState, dict]:
    """One optimizer step on a global batch; returns the new state and the batch's metrics.

    Gradients are taken with respect to the trainable parameters only: the frozen ones (the text
    encoder, and the image encoder when config.model.freeze_image_encoder) enter the loss as
    constants, so no gradient of their weights is computed, normed or stored, and the optimizer
    neither reads nor writes them (they pass through the step as the buffers they were).
    `grad_norm` is the global norm of the trainable parameters' gradients.

    With grad_accum_steps = A > 1 the batch is cut into A micro-batches of B / A clips
    (`micro_batches`), run one after another (lax.scan) and their gradients averaged: the
    update of one batch of B in about 1/A of the activation memory. Dropout keys: the step's key
    fold_in(dropout_rng, step) with A = 1; fold_in(that key, i) for micro-batch i with A > 1 —
    so switching accumulation on changes the dropout draws (not their distribution), and a run
    is reproducible for a given A.

    `method` None applies the model to pixels; "from_features" to cached per-frame features.

    A step whose loss or gradient is not finite leaves parameters and optimizer state as they
    were (apply_if_finite); `finite` in the metrics tells the host, which stops or counts it
    (config.train.skip_nonfinite).
    """
    rng = jax.random.fold_in(dropout_rng, state.step)
    groups = optim.flat_groups(
        state.params, freeze_image_encoder=getattr(model, "freeze_image_encoder", False)
    )
    flat = traverse_util.flatten_dict(state.params)
    trainable = {k: v for k, v in flat.items() if groups[k] != optim.FROZEN}
    frozen = {k: v for k, v in flat.items() if groups[k] == optim.FROZEN}
    with_frozen = lambda t: traverse_util.unflatten_dict({**frozen, **t})  # noqa: E731

    def loss_fn(trainable_params, micro, key):
        face, context = stream_inputs(micro, streams)
        logits, _ = model.apply(
            {"params": with_frozen(trainable_params)},
            face,
            context,
            train=True,
            rngs={"dropout": key},
            method=method,
        )
        with jax.named_scope("loss"):
            accuracy = jnp.mean(jnp.argmax(logits, -1) == micro["label"])
            return cross_entropy(logits, micro["label"]), accuracy

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss, accuracy), grads = grad_fn(trainable, batch, rng)
    else:

        def accumulate(total, xs):
            micro, i = xs
            (loss, accuracy), grads = grad_fn(trainable, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, total, (grads, loss, accuracy)), None

        zero = jnp.zeros((), jnp.float32)
        total = (jax.tree.map(jnp.zeros_like, trainable), zero, zero)
        xs = (micro_batches(batch, grad_accum_steps), jnp.arange(grad_accum_steps))
        total, _ = jax.lax.scan(accumulate, total, xs)
        # equal micro-batches: the mean of their means is the batch mean
        grads, loss, accuracy = jax.tree.map(lambda x: x / grad_accum_steps, total)
    new_state, health = apply_if_finite(state, grads, loss, tx, groups=groups)
    return new_state, {"loss": loss, "accuracy": accuracy, **health}


def apply_if_finite(
    state: state_lib.TrainState,
    grads: dict,
    loss: jax.Array,
    tx: optax.GradientTransformation,
    *,
    groups: dict | None = None,
) -> tuple[state_lib.TrainState, dict]:
    """The state after `tx`'s update from `grads`, or with parameters and optimizer state as
    they were when the loss or the gradient norm is not finite (the step counter advances either
    way, keeping it aligned with the data); and {"grad_norm", "finite"} for the host, which stops
    or counts such a step.

    `grads` maps flattened parameter paths to gradients: those of the trained parameters. Every
    other parameter (a frozen group) passes through the step as the buffer it was: the optimizer
    neither reads nor writes it. `groups` ({path: group}) names each update's scope
    optimizer/<group>, for caer_jax.traffic's accounting.
    """
    with jax.named_scope("grad_norm"):
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    flat = traverse_util.flatten_dict(state.params)
    trained = {k: flat[k] for k in grads}

    def update(_):
        # Frozen parameters get zero gradients that their transform (optax.set_to_zero) ignores
        # and the compiler drops: they give tx the tree it was built for.
        zeros = {k: jnp.zeros_like(v) for k, v in flat.items() if k not in grads}
        full = traverse_util.unflatten_dict({**zeros, **grads})
        updates, opt_state = tx.update(full, state.opt_state, state.params)
        flat_updates = traverse_util.flatten_dict(updates)
        new = {}
        for k, param in trained.items():
            with jax.named_scope(f"optimizer/{(groups or {}).get(k, 'all')}"):
                new[k] = optax.apply_updates(param, flat_updates[k])
        return new, opt_state

    # A conditional rather than a select between old and new values: the update writes the
    # parameters and optimizer state once, in place, and a skipped step touches neither.
    new, opt_state = jax.lax.cond(finite, update, lambda _: (trained, state.opt_state), None)
    new_state = state.replace(
        step=state.step + 1,
        params=traverse_util.unflatten_dict({**flat, **new}),
        opt_state=opt_state,
    )
    return new_state, {"grad_norm": grad_norm, "finite": finite}


def pretrain_step(
    state: state_lib.TrainState,
    batch: dict,
    *,
    model: contrastive.ContrastiveCLIP,
    tx: optax.GradientTransformation,
    pixel_normalization: str,
    max_logit_scale: float,
) -> tuple[state_lib.TrainState, dict]:
    """One contrastive optimizer step on a global batch of frames: face and context images
    against their captions in one 2B x 2B similarity matrix (exp(t) clipped at
    `max_logit_scale`). A non-finite step leaves the state as it was (apply_if_finite)."""
    pixels = jnp.concatenate([batch["face"], batch["context"]])
    images = caer.encoder_input(pixels, pixel_normalization)
    ids = jnp.concatenate([batch["face_ids"], batch["context_ids"]])

    def loss_fn(params):
        image_features, text_features, log_scale = model.apply({"params": params}, images, ids)
        scale = jnp.minimum(jnp.exp(log_scale), max_logit_scale)
        loss, accuracy = contrastive.contrastive_loss(image_features, text_features, scale)
        return loss, (accuracy, scale)

    (loss, (accuracy, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, health = apply_if_finite(state, traverse_util.flatten_dict(grads), loss, tx)
    return new_state, {"loss": loss, "accuracy": accuracy, "logit_scale": scale, **health}


def eval_step(params: Any, batch: dict, *, model, streams: str, method: str | None = None) -> dict:
    """Class probabilities of a padded eval batch, with what is needed to drop the padding."""
    face, context = stream_inputs(batch, streams)
    logits, _ = model.apply({"params": params}, face, context, train=False, method=method)
    return {
        "probs": jax.nn.softmax(logits, axis=-1),
        "label": batch["label"],
        "mask": batch["mask"],
        "index": batch["index"],
    }
