"""Evaluation of CLIP-CAER parameters and checkpoints (the library behind `caer_jax.eval`).

Restores a checkpoint onto whatever devices are present, runs every clip of the split exactly
once, and writes metrics (JSON), the confusion matrix (PNG) and per-clip predictions (CSV).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from caer_jax import checkpoint, metrics, sharding, steps
from caer_jax import state as state_lib
from caer_jax.data import feature_cache, pipeline
from caer_jax.models import caer
from caer_jax.prompts import CLASS_NAMES


def make_eval_step(model, config: ml_collections.ConfigDict, mesh, params: Any):
    """The jitted eval step for `params`' layout on `mesh` (build once, call every epoch)."""
    return jax.jit(
        functools.partial(
            steps.eval_step,
            model=model,
            streams=config.model.streams,
            method=feature_cache.apply_method(config),
        ),
        in_shardings=(sharding.tree_shardings(params, mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def predict_split(
    step_fn, params: Any, config: ml_collections.ConfigDict, split: str, mesh
) -> dict:
    """Class probabilities, labels and record indices of every clip of `split`, once each."""
    outputs = []
    # Pixels, or the features of params' frozen image encoder (the cache must be built).
    batches = feature_cache.eval_batches(
        config,
        split,
        params,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for host_batch in tqdm(batches, desc=f"eval {split}", disable=jax.process_index() != 0):
        out = jax.device_get(step_fn(params, pipeline.global_batch(host_batch, mesh)))
        keep = out.pop("mask")
        outputs.append({k: v[keep] for k, v in out.items()})
    result = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    order = np.argsort(result["index"], kind="stable")
    return {k: v[order] for k, v in result.items()}


def evaluate(step_fn, params: Any, config: ml_collections.ConfigDict, split: str, mesh) -> dict:
    """WAR, UAR, per-class recall and confusion matrix of `params` on `split` (with `step_fn`
    from make_eval_step)."""
    predictions = predict_split(step_fn, params, config, split, mesh)
    cm = metrics.confusion_matrix(
        predictions["label"], predictions["probs"].argmax(-1), len(CLASS_NAMES)
    )
    summary = metrics.summarize(cm, CLASS_NAMES)
    summary["predictions"] = predictions
    return summary


def _write_predictions(predictions: dict, video_ids: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "label", "prediction", *[f"p_{c}" for c in CLASS_NAMES]])
        for index, label, probs in zip(
            predictions["index"], predictions["label"], predictions["probs"], strict=True
        ):
            writer.writerow(
                [
                    video_ids[index],
                    CLASS_NAMES[label],
                    CLASS_NAMES[probs.argmax()],
                    *[f"{p:.6f}" for p in probs],
                ]
            )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | Path, *, step: str | int, split: str
) -> dict:
    """Restores `step` from `workdir`, evaluates `split`, writes metrics, plot and predictions."""
    workdir = Path(workdir)
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    resolved = ckpts.resolve_step(step)
    mesh = sharding.make_mesh(config.mesh)
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    abstract = state_lib.abstract_params(model, config)
    target = checkpoint.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
    params, meta = ckpts.restore_params(resolved, target, config=config)
    ckpts.close()
    logging.info("restored the parameters of step %d from %s", resolved, ckpts.directory)

    if config.data.feature_cache.enabled:  # where missing, from the restored encoder
        feature_cache.build(
            config,
            model,
            params,
            split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
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
    )
    if jax.process_index() == 0:
        suffix = "" if split == config.data.eval_split else f"_{split}"
        metrics.write_json(summary, workdir / f"metrics{suffix}.json")
        metrics.plot_confusion_matrix(
            np.asarray(summary["confusion_matrix"]),
            CLASS_NAMES,
            workdir / f"confusion_matrix{suffix}.png",
            title=f"{split} step {resolved}: UAR {summary['uar']:.1f} WAR {summary['war']:.1f}",
        )
        _write_predictions(
            predictions, pipeline.video_ids(config, split), workdir / f"predictions{suffix}.csv"
        )
    return summary
