"""Parameter groups, learning-rate schedules and the optax optimizer of CLIP-CAER.

The authors train with torch.optim.SGD over four parameter groups with their own learning rates
and freeze the CLIP text encoder. Here every parameter gets a group label from its top-level
module; `optax.multi_transform` gives each group its own chain and the frozen group no update
(and no optimizer state). config.model.freeze_image_encoder puts the image encoder in the frozen
group too (the feature cache needs its weights fixed).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from caer_jax import errors

FROZEN = "frozen"
# Top-level parameter collections of CLIPCAER -> group name (a key of config.optim.lr or FROZEN).
GROUP_OF_MODULE = {
    "image_encoder": "image_encoder",
    "text_encoder": FROZEN,
    "prompt_learner": "prompt_learner",
    "temporal_face": "temporal",
    "temporal_context": "temporal",
    "project_fc": "project_fc",
}


def param_groups(params: Any, *, freeze_image_encoder: bool = False) -> Any:
    """A tree like `params` whose leaves are group names."""

    def group(path: tuple[str, ...], _) -> str:
        if path[0] not in GROUP_OF_MODULE:
            raise KeyError(f"parameter {'/'.join(path)} belongs to no optimizer group")
        if freeze_image_encoder and path[0] == "image_encoder":
            return FROZEN
        return GROUP_OF_MODULE[path[0]]

    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: group(k, v) for k, v in flat.items()})


def flat_groups(params: Any, *, freeze_image_encoder: bool = False) -> dict:
    """{flattened parameter path: its group} (FROZEN: the optimizer never updates it)."""
    labels = param_groups(params, freeze_image_encoder=freeze_image_encoder)
    return flax.traverse_util.flatten_dict(labels)


def lr_schedule(base_lr: float, optim_config: ml_collections.ConfigDict, steps_per_epoch: int):
    """MultiStepLR stepped per epoch: x gamma after each epoch in `milestones`; with
    `warmup_epochs` > 0, first a linear ramp from base_lr / warmup steps to base_lr (the
    milestones keep their epochs)."""
    steps = optax.piecewise_constant_schedule(
        base_lr,
        {int(m) * steps_per_epoch: optim_config.gamma for m in optim_config.milestones},
    )
    warmup = round(optim_config.warmup_epochs * steps_per_epoch)
    if warmup <= 0:
        return steps
    return lambda step: steps(step) * jnp.minimum(1.0, (step + 1) / warmup)


def _group_optimizer(
    base_lr: float, optim_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    schedule = lr_schedule(base_lr, optim_config, steps_per_epoch)
    if optim_config.name == "sgd":
        # torch.optim.SGD: g += wd * p (coupled L2), buf = momentum * buf + g, p -= lr * buf.
        return optax.chain(
            optax.add_decayed_weights(optim_config.weight_decay),
            optax.sgd(schedule, momentum=optim_config.momentum),
        )
    if optim_config.name == "adamw":
        return optax.adamw(schedule, weight_decay=optim_config.weight_decay)
    raise errors.BadInputError(
        f"config.optim.name={optim_config.name!r}: unknown optimizer (sgd, adamw)"
    )


def _named(group: str, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with its update under the name scope optimizer/<group>, so that the compiled
    program's operations say which parameter group they update (caer_jax.traffic)."""

    def update(updates, state, params=None):
        with jax.named_scope(f"optimizer/{group}"):
            return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(
    params: Any,
    optim_config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    *,
    freeze_image_encoder: bool = False,
) -> optax.GradientTransformation:
    """The multi-group optimizer; every group present in `params` needs a learning rate.
    Pass config.model.freeze_image_encoder as `freeze_image_encoder`."""
    labels = param_groups(params, freeze_image_encoder=freeze_image_encoder)
    present = set(flax.traverse_util.flatten_dict(labels).values()) - {FROZEN}
    missing = sorted(g for g in present if g not in optim_config.lr)
    if missing:
        raise KeyError(f"config.optim.lr has no learning rate for group(s) {missing}")
    # Sorted: a set's order follows the process's string hash seed, and the transforms' order
    # is the order of the ops in the compiled step, so another order would be another program
    # for the persistent compilation cache.
    transforms = {
        group: _named(
            group, _group_optimizer(optim_config.lr[group], optim_config, steps_per_epoch)
        )
        for group in sorted(present)
    }
    transforms[FROZEN] = optax.set_to_zero()
    return optax.multi_transform(transforms, labels)


def describe_groups(
    params: Any, optim_config: ml_collections.ConfigDict, *, freeze_image_encoder: bool = False
) -> list[str]:
    """One line per parameter: path, shape, group and base learning rate (for the start-up log)."""
    labels = flax.traverse_util.flatten_dict(
        param_groups(params, freeze_image_encoder=freeze_image_encoder)
    )
    lines = []
    for path, leaf in flax.traverse_util.flatten_dict(params).items():
        group = labels[path]
        lr = "frozen" if group == FROZEN else f"lr={optim_config.lr[group]:g}"
        lines.append(f"{'/'.join(path)} {tuple(leaf.shape)} group={group} {lr}")
    return lines
