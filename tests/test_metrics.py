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


def _direct_bootstrap(labels, preds, picks, names):
    """The bootstrap by its definition: summarize() each resample's confusion matrix."""
    rows = [
        metrics.summarize(metrics.confusion_matrix(labels[p], preds[p], len(names)), names)
        for p in picks
    ]
    recall = {
        name: [r["per_class"][name]["recall"] for r in rows if r["per_class"][name]["support"]]
        for name in names
    }
    return [r["war"] for r in rows], [r["uar"] for r in rows], recall


def test_bootstrap_matches_a_direct_loop_over_resamples():
    rng = np.random.default_rng(3)
    # 30 clips, class 4 rare (2 clips): many resamples lack it
    labels = np.array([0] * 10 + [1] * 8 + [2] * 6 + [3] * 4 + [4] * 2)
    preds = np.where(rng.random(30) < 0.7, labels, rng.integers(0, 5, 30))
    got = metrics.bootstrap_intervals(
        labels, preds, CLASS_NAMES, resamples=400, seed=11, confidence=0.9
    )
    picks = metrics.resample_indices(len(labels), 400, 11)
    war, uar, recall = _direct_bootstrap(labels, preds, picks, CLASS_NAMES)
    assert got["war"] == pytest.approx(np.percentile(war, [5, 95]).tolist())
    assert got["uar"] == pytest.approx(np.percentile(uar, [5, 95]).tolist())
    for name in CLASS_NAMES:
        assert got["recall"][name] == pytest.approx(np.percentile(recall[name], [5, 95]).tolist())
        assert got["resamples_without_class"][name] == 400 - len(recall[name])
    # P(a resample of 30 lacks both clips of class 4) = (28/30)^30 = 12.6 %
    assert 25 <= got["resamples_without_class"]["Distraction"] <= 80
    assert (got["confidence"], got["resamples"], got["seed"]) == (0.9, 400, 11)


def test_bootstrap_interval_of_a_known_distribution():
    # 540 clips, 70 % of them right in every class: WAR over a resample is binomial,
    # 100 * B(540, 0.7) / 540, whose 95 % interval is 70 +- 1.96 * sqrt(0.21 / 540) = 70 +- 3.87.
    labels = np.repeat(np.arange(5), 108)
    preds = np.where(np.arange(540) % 10 < 7, labels, (labels + 1) % 5)
    got = metrics.bootstrap_intervals(
        labels, preds, CLASS_NAMES, resamples=2000, seed=0, confidence=0.95
    )
    assert got["war"] == pytest.approx([66.13, 73.87], abs=0.6)
    # each class: 108 clips, recall 70 % -> +- 1.96 * sqrt(0.21 / 108) = +- 8.6
    for name in CLASS_NAMES:
        assert got["recall"][name] == pytest.approx([61.4, 78.6], abs=1.5)


def test_bootstrap_of_perfect_and_split_predictions_is_exact():
    labels = np.array([0, 0, 1, 1, 1, 3])
    got = metrics.bootstrap_intervals(
        labels, labels, CLASS_NAMES, resamples=100, seed=0, confidence=0.95
    )
    assert got["war"] == got["uar"] == [100.0, 100.0]
    assert got["recall"]["Neutrality"] == [100.0, 100.0]
    # classes absent from the split: no interval, and every resample lacks them
    assert got["recall"]["Confusion"] is None and got["recall"]["Distraction"] is None
    assert got["resamples_without_class"]["Confusion"] == 100
    # class 0 always right, class 1 always wrong: recalls 100 and 0 wherever the class occurs.
    # A resample of these 4 clips lacks class 1 (UAR 100: class 0 alone) or class 0 (UAR 0) with
    # probability 1/16 each, more than the 2.5 % tails.
    wrong = metrics.bootstrap_intervals(
        np.array([0, 0, 1, 1]),
        np.zeros(4, int),
        CLASS_NAMES,
        resamples=1000,
        seed=0,
        confidence=0.95,
    )
    assert wrong["recall"]["Neutrality"] == [100.0, 100.0]
    assert wrong["recall"]["Enjoyment"] == [0.0, 0.0]
    assert wrong["uar"] == [0.0, 100.0]
    assert 30 <= wrong["resamples_without_class"]["Enjoyment"] <= 100


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="label 7 outside 0..4"):
        metrics.bootstrap_intervals(
            np.array([7]), np.array([0]), CLASS_NAMES, resamples=10, seed=0, confidence=0.95
        )
    with pytest.raises(ValueError, match="expected two equal, non-empty vectors"):
        metrics.bootstrap_intervals(
            np.array([0, 1]), np.array([0]), CLASS_NAMES, resamples=10, seed=0, confidence=0.95
        )
    with pytest.raises(ValueError, match="need >= 1 and"):
        metrics.bootstrap_intervals(
            np.array([0]), np.array([0]), CLASS_NAMES, resamples=10, seed=0, confidence=95
        )


def test_mean_and_sample_sd_of_seeds():
    assert metrics.mean_and_sd([60, 70, 80]) == (70.0, 10.0)
    assert metrics.mean_and_sd([93.26, 93.49, 92.09]) == pytest.approx((92.9467, 0.7507), abs=1e-4)
    assert metrics.mean_and_sd([42.0]) == (42.0, None)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.mean_and_sd([])
