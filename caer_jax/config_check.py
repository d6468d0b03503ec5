"""Config values whose valid range is narrower than their type, checked before a command starts.

The flag parser refuses unknown field names and values of the wrong type (cli.py); this module
refuses counts below one, negative rates and probabilities outside [0, 1] with one error naming
the field, where they would otherwise surface minutes later as a division by zero or a shape
error deep inside data preparation or tracing. Values whose check needs more than the config (a
mesh against the devices, a label set file, CLIP weights, a choice among a module's options) are
checked by the module that uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from caer_jax import errors

Rule = tuple[Callable[[float], bool], str]


def _at_least(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low}"


def _positive() -> Rule:
    return (lambda v: v > 0), "> 0"


def _probability(*, below_one: bool = False) -> Rule:
    if below_one:
        return (lambda v: 0 <= v < 1), "in [0, 1)"
    return (lambda v: 0 <= v <= 1), "in [0, 1]"


def _open_unit() -> Rule:
    return (lambda v: 0 < v < 1), "in (0, 1)"


# Dotted field -> rule. A tuple value (optim.milestones) is checked element by element, a
# ConfigDict (optim.lr, one rate per parameter group) field by field.
RULES: dict[str, Rule] = {
    "data.num_segments": _at_least(1),
    "data.duration": _at_least(1),
    "data.image_size": _at_least(1),
    "data.rotation_degrees": _at_least(0),
    "data.flip_prob": _probability(),
    "data.prefetch_buffer_size": _at_least(0),
    "data.device_prefetch": _at_least(1),
    "data.feature_cache.clips_per_chunk": _at_least(1),
    "data.feature_cache.frames_per_batch": _at_least(1),
    "model.logit_scale": _positive(),
    "model.temporal.heads": _at_least(1),
    "model.temporal.head_dim": _at_least(1),
    "model.temporal.mlp_dim": _at_least(1),
    "model.temporal.dropout": _probability(below_one=True),
    "optim.lr": _at_least(0),
    "optim.momentum": _at_least(0),
    "optim.weight_decay": _at_least(0),
    "optim.gamma": _positive(),
    "optim.milestones": _at_least(0),
    "optim.warmup_epochs": _at_least(0),
    "optim.warmup_steps": _at_least(0),
    "train.num_epochs": _at_least(1),
    "train.num_steps": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.grad_accum_steps": _at_least(1),
    "train.eval_batch_size": _at_least(1),
    "train.log_every_steps": _at_least(1),
    "train.keep_checkpoints": _at_least(1),
    "train.checkpoint_every_steps": _at_least(0),
    "eval.bootstrap_resamples": _at_least(1),
    "eval.confidence": _open_unit(),
}


def _lookup(config: ml_collections.ConfigDict, field: str):
    node = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None  # a config without the field (an older or custom one) is not checked
        node = node[part]
    return node


def _values(field: str, value) -> list[tuple[str, object]]:
    if isinstance(value, ml_collections.ConfigDict):
        return [(f"{field}.{k}", v) for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return [(f"{field}[{i}]", v) for i, v in enumerate(value)]
    return [(field, value)]


def check(config: ml_collections.ConfigDict) -> None:
    """Raises BadInputError naming every field of `config` whose value is out of its range."""
    bad = []
    for field, (valid, expected) in RULES.items():
        value = _lookup(config, field)
        if value is None:
            continue
        for name, v in _values(field, value):
            if not valid(v):
                bad.append(f"config.{name}={v!r} (expected {expected})")
    batch, accum = _lookup(config, "train.batch_size"), _lookup(config, "train.grad_accum_steps")
    if batch is not None and accum is not None and batch >= 1 and accum >= 1 and batch % accum:
        bad.append(
            f"config.train.grad_accum_steps={accum} does not divide config.train.batch_size={batch}"
        )
    if bad:
        raise errors.BadInputError("; ".join(bad))
