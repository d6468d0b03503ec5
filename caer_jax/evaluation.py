"""Evaluation of CLIP-CAER parameters and checkpoints (the library behind `caer_jax.eval`).

Restores a checkpoint onto whatever devices are present, runs every clip of the split exactly
once, and writes metrics (JSON, with bootstrap confidence intervals and the checkpoint's training
config), the confusion matrix (PNG) and per-clip predictions (CSV).
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from caer_jax import checkpoint, distributed, label_sets, metrics, sharding, steps
from caer_jax import state as state_lib
from caer_jax.data import feature_cache, pipeline, prefetch, prepare
from caer_jax.models import caer


def make_eval_step(
    model, config: ml_collections.ConfigDict, mesh, params: Any, *, zero_shot: bool = False
):
    """The jitted eval step for `params`' layout on `mesh` (build once, call every epoch);
    `zero_shot`: CLIPCAER.zero_shot's logits instead of the trained head's."""
    method = feature_cache.apply_method(config)
    if zero_shot:
        method = "zero_shot_from_features" if method == "from_features" else "zero_shot"
    step = functools.partial(
        steps.eval_step, model=model, streams=config.model.streams, method=method
    )
    return jax.jit(
        sharding.traced_for(mesh, step),
        in_shardings=(sharding.tree_shardings(params, mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def predict_split(
    step_fn, params: Any, config: ml_collections.ConfigDict, split: str, mesh
) -> dict:
    """Class probabilities, labels and record indices of every clip of `split`, once each."""
    # Pixels, or the features of params' frozen image encoder (the cache must be built).
    host_batches = feature_cache.eval_batches(
        config,
        split,
        params,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    # Batches reach the devices ahead of use and outputs stay there until the split is done:
    # one transfer back instead of a sync per batch.
    batches = prefetch.DevicePrefetch(host_batches, mesh, host_fields=())
    if (first := batches.peek()) is not None:
        distributed.compile_together("eval", step_fn, params, first)
    device_outputs = []
    for batch, _ in tqdm(batches, desc=f"eval {split}", disable=jax.process_index() != 0):
        device_outputs.append(step_fn(params, batch))
        if len(device_outputs) > 2:  # bounds the batches held on the devices
            jax.block_until_ready(device_outputs[-3])
    outputs = []
    for out in jax.device_get(device_outputs):
        keep = out.pop("mask")
        outputs.append({k: v[keep] for k, v in out.items()})
    result = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    order = np.argsort(result["index"], kind="stable")
    return {k: v[order] for k, v in result.items()}


def evaluate(step_fn, params: Any, config: ml_collections.ConfigDict, split: str, mesh) -> dict:
    """WAR, UAR, per-class recall and confusion matrix of `params` on `split` (with `step_fn`
    from make_eval_step)."""
    predictions = predict_split(step_fn, params, config, split, mesh)
    class_names = label_sets.load(config.model.label_set).class_names
    cm = metrics.confusion_matrix(
        predictions["label"], predictions["probs"].argmax(-1), len(class_names)
    )
    summary = metrics.summarize(cm, class_names)
    summary["predictions"] = predictions
    return summary


def _write_predictions(
    predictions: dict, video_ids: list[str], class_names: tuple[str, ...], path: Path
) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "label", "prediction", *[f"p_{c}" for c in class_names]])
        for index, label, probs in zip(
            predictions["index"], predictions["label"], predictions["probs"], strict=True
        ):
            writer.writerow(
                [
                    video_ids[index],
                    class_names[label],
                    class_names[probs.argmax()],
                    *[f"{p:.6f}" for p in probs],
                ]
            )


def _write_results(
    config: ml_collections.ConfigDict,
    workdir: Path,
    summary: dict,
    predictions: dict,
    *,
    split: str,
    title: str,
) -> dict:
    """Adds the class names and bootstrap intervals to `summary` and writes metrics.json,
    confusion_matrix.png and predictions.csv (suffixed `_<split>` for a split other than the
    config's eval split) into `workdir`."""
    class_names = label_sets.load(config.model.label_set).class_names
    summary.update(
        class_names=list(class_names),
        bootstrap=metrics.bootstrap_intervals(
            predictions["label"],
            predictions["probs"].argmax(-1),
            class_names,
            resamples=config.eval.bootstrap_resamples,
            seed=config.eval.bootstrap_seed,
            confidence=config.eval.confidence,
        ),
    )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        suffix = "" if split == config.data.eval_split else f"_{split}"
        metrics.write_json(summary, workdir / f"metrics{suffix}.json")
        metrics.plot_confusion_matrix(
            np.asarray(summary["confusion_matrix"]),
            class_names,
            workdir / f"confusion_matrix{suffix}.png",
            title=f"{title}: UAR {summary['uar']:.1f} WAR {summary['war']:.1f}",
        )
        _write_predictions(
            predictions,
            pipeline.video_ids(config, split),
            class_names,
            workdir / f"predictions{suffix}.csv",
        )
    return summary


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | Path, *, step: str | int, split: str
) -> dict:
    """Restores `step` from `workdir`, evaluates `split`, writes metrics, plot and predictions."""
    workdir = Path(workdir)
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    resolved = ckpts.resolve_step(step)
    prepare.check_split(config, split)  # before the checkpoint is read
    mesh = sharding.make_mesh(config.mesh)
    model, _ = caer.build_model(
        config.model,
        prompt_token_ids=checkpoint.saved_prompt_token_ids(ckpts.read_meta(resolved)),
        num_frames=config.data.num_segments,
    )
    abstract = state_lib.abstract_params(model, config)
    target = checkpoint.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
    params, meta = ckpts.restore_params(resolved, target, config=config)
    trained_with = ckpts.read_config(resolved)
    ckpts.close()
    logging.info("restored the parameters of step %d from %s", resolved, ckpts.directory)
    class_names = label_sets.load(config.model.label_set).class_names
    label_sets.check_same_classes(
        checkpoint.class_names(meta, class_names),
        f"checkpoint {ckpts.directory / str(resolved)}",
        pipeline.class_names(config),
        f"the dataset {config.data.tfds_name} in {config.data.data_dir or 'the TFDS default dir'}",
    )

    if config.data.feature_cache.enabled:  # where missing, from the restored encoder
        feature_cache.build_here(config, model, params, [split])
    step_fn = make_eval_step(model, config, mesh, params)
    summary = evaluate(step_fn, params, config, split, mesh)
    predictions = summary.pop("predictions")
    summary.update(
        split=split,
        step=resolved,
        checkpoint=str(step),
        epoch=meta["epoch"],
        protocol=meta["protocol"],
        streams=config.model.streams,
        # caer_jax.report groups runs whose training configs differ only by the seed.
        train_config=trained_with,
    )
    return _write_results(
        config, workdir, summary, predictions, split=split, title=f"{split} step {resolved}"
    )


ZERO_SHOT = "zero-shot"


def zero_shot_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` as zero-shot CLIP evaluates it: the class texts without learned context tokens
    (prompt.n_ctx = 0), so that the text features are CLIP's own embeddings of the texts."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.model.prompt.n_ctx = 0
    return c


def evaluate_zero_shot(
    config: ml_collections.ConfigDict, workdir: str | Path, *, split: str
) -> dict:
    """Zero-shot CLIP on `split`, nothing trained: config.model.clip.source's encoders, the
    class texts of config.model.prompt.text_type, the image features of config.model.streams
    pooled as CLIPCAER.zero_shot_from_features says. Writes what evaluate_checkpoint writes,
    with checkpoint "zero-shot" and the evaluated config (n_ctx 0) as its train_config."""
    workdir = Path(workdir)
    config = zero_shot_config(config)
    # The first command of a fresh demo: nothing may have generated the synthetic data yet.
    prepare.prepare_data(config)  # also refuses a dataset of other classes than the label set
    prepare.check_split(config, split)
    mesh = sharding.make_mesh(config.mesh)
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    # The temporal nets and fusion are initialised too (zero_shot does not use them): the
    # parameter tree stays the model's, which the eval step and the feature cache expect.
    params = caer.init_params(model, config.model, jax.random.key(config.seed))
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))
    if config.data.feature_cache.enabled:
        feature_cache.build_here(config, model, params, [split])
    step_fn = make_eval_step(model, config, mesh, params, zero_shot=True)
    summary = evaluate(step_fn, params, config, split, mesh)
    predictions = summary.pop("predictions")
    summary.update(
        split=split,
        step=0,
        checkpoint=ZERO_SHOT,
        epoch=0,
        protocol="zero-shot (no training)",
        streams=config.model.streams,
        train_config=json.loads(json.dumps(config.to_dict())),
    )
    title = f"{split} zero-shot, {config.model.prompt.text_type}"
    return _write_results(config, workdir, summary, predictions, split=split, title=title)
