"""WAR, UAR and the confusion matrix on hand-computed cases; the plots are written."""

import json

import numpy as np
import pytest

from caer_jax import metrics
from caer_jax.prompts import CLASS_NAMES


def test_known_confusion_matrix():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 3, 4, 4])
    preds = np.array([0, 0, 0, 4, 1, 2, 0, 3, 4, 0])
    cm = metrics.confusion_matrix(labels, preds, 5)
    assert cm[0].tolist() == [3, 0, 0, 0, 1]
    assert cm.sum() == 10
    summary = metrics.summarize(cm, CLASS_NAMES)
    assert summary["war"] == pytest.approx(70.0)
    # recalls 3/4, 1, 1/2, 1, 1/2 -> mean 0.75
    assert summary["uar"] == pytest.approx(75.0)
    assert summary["per_class"]["Confusion"] == {"recall": pytest.approx(50.0), "support": 2}


def test_class_without_clips_is_left_out_of_uar():
    cm = metrics.confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 5)
    summary = metrics.summarize(cm, CLASS_NAMES)
    assert summary["uar"] == pytest.approx(75.0)
    assert summary["per_class"]["Fatigue"] == {"recall": None, "support": 0}


def test_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="label 5 outside 0..4"):
        metrics.confusion_matrix(np.array([5]), np.array([0]), 5)


def test_files(tmp_path):
    cm = metrics.confusion_matrix(np.array([0, 1, 2, 3, 4]), np.array([0, 1, 2, 3, 0]), 5)
    summary = metrics.summarize(cm, CLASS_NAMES)
    metrics.write_json(summary, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["uar"] == pytest.approx(80.0)
    metrics.plot_confusion_matrix(cm, CLASS_NAMES, tmp_path / "cm.png", title="t")
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "uar": 20.0 * e, "war": 25.0 * e, "split": "test"}
        for e in (1, 2, 3)
    ]
    metrics.plot_curves(history, tmp_path / "curves.png")
    for name in ("cm.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
