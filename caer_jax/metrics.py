"""Evaluation metrics of RAER (WAR, UAR, per-class recall, confusion matrix), their bootstrap
confidence intervals, and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure


def _check_range(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> None:
    for name, values in (("label", labels), ("prediction", predictions)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(f"{name} {values[bad][0]} outside 0..{num_classes - 1}")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]; labels outside 0..num_classes-1 are an error."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    _check_range(labels, predictions, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def summarize(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """WAR, UAR (percent) and per-class recall and support from a confusion matrix.

    UAR averages the recall of the classes that occur; a class without clips has no recall.
    """
    support = cm.sum(axis=1)
    present = support > 0
    recall = np.where(present, np.diag(cm) / np.maximum(support, 1), np.nan)
    return {
        "war": 100.0 * np.trace(cm) / max(cm.sum(), 1),
        "uar": 100.0 * float(np.mean(recall[present])) if present.any() else 0.0,
        "num_clips": int(cm.sum()),
        "per_class": {
            name: {
                "recall": None if np.isnan(r) else 100.0 * float(r),
                "support": int(s),
            }
            for name, r, s in zip(class_names, recall, support, strict=True)
        },
        "confusion_matrix": cm.tolist(),
    }


def resample_indices(num_clips: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, num_clips] clip indices drawn with replacement (one bootstrap resample a row)."""
    return np.random.default_rng(seed).integers(0, num_clips, size=(resamples, num_clips))


def bootstrap_intervals(
    labels: np.ndarray,
    predictions: np.ndarray,
    class_names: Sequence[str],
    *,
    resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    """Percentile bootstrap intervals (percent) of WAR, UAR and each class's recall.

    The clips of the split are resampled with replacement `resamples` times (rows of
    resample_indices(len(labels), resamples, seed)); each resample is scored as summarize scores
    a split. A resample that lacks a class has no recall for it: that class's interval is taken
    over the resamples that hold it (their number is returned), and the resample's UAR averages
    the classes it holds. A class absent from the split has no interval (None).
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1 or not len(labels):
        raise ValueError(
            f"labels {labels.shape} and predictions {predictions.shape}: expected two equal, "
            "non-empty vectors"
        )
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"{resamples} resamples at confidence {confidence}: need >= 1 and (0, 1)")
    num_classes = len(class_names)
    _check_range(labels, predictions, num_classes)
    picks = resample_indices(len(labels), resamples, seed)
    picked = labels[picks]
    # One bincount over (resample, class) codes gives every resample's support and hits at once.
    codes = (np.arange(resamples)[:, None] * num_classes + picked).ravel()
    size = resamples * num_classes
    support = np.bincount(codes, minlength=size).reshape(resamples, num_classes)
    hits = (predictions[picks] == picked).ravel().astype(np.float64)
    correct = np.bincount(codes, weights=hits, minlength=size).reshape(resamples, num_classes)
    held = support > 0
    recall = 100.0 * correct / np.maximum(support, 1)  # [resamples, classes]; valid where held
    war = 100.0 * correct.sum(axis=1) / len(labels)
    uar = (recall * held).sum(axis=1) / held.sum(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0

    def interval(values: np.ndarray) -> list[float]:
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return [float(low), float(high)]

    in_split = np.bincount(labels, minlength=num_classes) > 0
    return {
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "war": interval(war),
        "uar": interval(uar),
        "recall": {
            name: interval(recall[held[:, k], k]) if in_split[k] else None
            for k, name in enumerate(class_names)
        },
        "resamples_without_class": {
            name: int(resamples - held[:, k].sum()) for k, name in enumerate(class_names)
        },
    }


def mean_and_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (divisor n - 1) of one figure over runs that differ
    only by seed: the seeds are a sample of the seeds one could have run, and the population sd
    would understate the spread, most with the 2-5 seeds a table shows. The sd of one run is
    None (undefined). Every table of seeds (report, ablate) uses this one function."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mean_and_sd needs a non-empty list of figures, got {values!r}")
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)


def write_json(metrics: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def plot_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> None:
    """Row-normalised confusion matrix with counts, as a PNG."""
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(6, 5))  # no pyplot: no backend, no display, nothing to close
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if rows[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{rows[i, j]:.2f}\n({cm[i, j]})",
                ha="center",
                va="center",
                fontsize=8,
                color=colour,
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(history: Sequence[dict], path: Path) -> None:
    """Training loss and evaluation WAR/UAR per epoch, as a PNG."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, score_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    for key in ("uar", "war"):
        score_ax.plot(epochs, [h[key] for h in history], marker="o", label=key.upper())
    score_ax.set_xlabel("epoch")
    score_ax.set_ylabel(f"{history[0]['split']} score (%)" if history else "score (%)")
    score_ax.set_ylim(0, 100)
    score_ax.legend()
    for ax in (loss_ax, score_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pretrain_curves(history: Sequence[dict], path: Path) -> None:
    """Pretraining loss and in-batch image->text accuracy per logged step, as a PNG."""
    steps = [h["step"] for h in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, [h["train_loss"] for h in history], marker="o")
    loss_ax.set_ylabel("contrastive loss")
    acc_ax.plot(steps, [100 * h["accuracy"] for h in history], marker="o")
    acc_ax.set_ylabel("image->text top-1 in batch (%)")
    acc_ax.set_ylim(0, 100)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
