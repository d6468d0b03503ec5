"""caer_jax.report: intervals in every row, runs that differ only by seed summarised as mean +- sd,
other differences kept apart, and clear errors for folders it cannot report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caer_jax import metrics, report
from caer_jax.prompts import CLASS_NAMES
from configs import synthetic_tiny

REPO = Path(__file__).resolve().parents[1]
LABELS = np.repeat(np.arange(5), 2)  # 10 clips, 2 per class


def write_run(workdir: Path, *, seed: int, right: int, variant: str = "", **config_fields) -> dict:
    """A metrics.json as evaluation writes it: the first `right` of the 10 clips predicted right,
    the others as class (label + 1) % 5."""
    config = synthetic_tiny.get_config(variant)
    config.seed = seed
    for name, value in config_fields.items():
        section, field = name.split("__")
        config[section][field] = value
    preds = np.where(np.arange(10) < right, LABELS, (LABELS + 1) % 5)
    summary = metrics.summarize(metrics.confusion_matrix(LABELS, preds, 5), CLASS_NAMES)
    summary.update(
        class_names=list(CLASS_NAMES),
        split="test",
        checkpoint="best",
        streams=config.model.streams,
        train_config=json.loads(json.dumps(config.to_dict())),
        bootstrap=metrics.bootstrap_intervals(
            LABELS, preds, CLASS_NAMES, resamples=200, seed=0, confidence=0.95
        ),
    )
    workdir.mkdir(parents=True)
    metrics.write_json(summary, workdir / "metrics.json")
    return summary


def test_seeds_are_summarised_with_intervals_and_other_runs_kept_apart(tmp_path):
    runs = {
        seed: write_run(tmp_path / "tiny" / f"seed_{seed}", seed=seed, right=right)
        for seed, right in ((42, 6), (43, 7), (44, 8))
    }
    face = write_run(tmp_path / "face", seed=42, right=5, variant="face")
    text = report.table([tmp_path / "tiny", tmp_path / "face"])
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["run", "streams", "split", "UAR", "WAR"]
    # WAR 60, 70, 80 -> 70.00 +- 10.00 (sample sd); UAR the same here (2 clips per class)
    summary = lines[2]
    assert summary.startswith(f"{tmp_path / 'tiny'}: mean +- sd of seeds 42,43,44")
    assert summary.split()[7:9] == ["both", "test"]
    assert summary.count("70.00 +- 10.00") == 2
    # per-seed rows under it, in seed order, with their intervals
    for line, seed in zip(lines[3:6], (42, 43, 44), strict=True):
        run = runs[seed]
        assert line.startswith(f"  {tmp_path / 'tiny' / f'seed_{seed}'}")
        low, high = run["bootstrap"]["uar"]
        assert f"{run['uar']:.2f} [{low:.1f}, {high:.1f}]" in line
    # the face run differs by more than its seed: a row of its own, no summary
    low, high = face["bootstrap"]["war"]
    assert lines[6].split()[:3] == [str(tmp_path / "face"), "face", "test"]
    assert f"50.00 [{low:.1f}, {high:.1f}]" in lines[6]
    assert len(lines) == 8 and "95 % bootstrap interval" in lines[7]


def test_runs_of_one_folder_that_differ_otherwise_are_not_averaged(tmp_path):
    write_run(tmp_path / "tiny" / "seed_0", seed=0, right=6)
    write_run(tmp_path / "tiny" / "seed_1", seed=1, right=7)
    write_run(tmp_path / "tiny" / "seed_2", seed=2, right=8, train__num_epochs=3)
    text = report.table([tmp_path / "tiny"])
    assert "mean +- sd of seeds 0,1  " in text and "seeds 0,1,2" not in text
    assert (
        f"note: {tmp_path / 'tiny' / 'seed_2'} differs from {tmp_path / 'tiny' / 'seed_0'} in "
        "more than the seed (config.train.num_epochs); not summarised together"
    ) in text


@pytest.mark.slow  # the command in its own process
def test_errors_name_the_folder(tmp_path):
    write_run(tmp_path / "a", seed=1, right=6)
    write_run(tmp_path / "b", seed=1, right=7)
    with pytest.raises(report.ReportError, match="the same config and seed 1"):
        report.table([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(report.ReportError, match=f"{tmp_path / 'nothing'}: no metrics.json"):
        report.table([tmp_path / "nothing"])
    old = json.loads((tmp_path / "a" / "metrics.json").read_text())
    del old["bootstrap"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(old))
    with pytest.raises(report.ReportError, match="metrics.json: no bootstrap .*caer_jax.eval"):
        report.table([tmp_path / "old"])
    result = subprocess.run(
        [sys.executable, "-m", "caer_jax.report", str(tmp_path / "old")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'old' / 'metrics.json'}: no bootstrap")
    for args, code, out, err in (
        (["--help"], 0, "usage: python -m caer_jax.report RUN_DIR", ""),
        ([], 2, "", "error: usage: python -m caer_jax.report RUN_DIR"),
        (["--step=best", str(tmp_path / "a")], 2, "", "error: unknown flag --step=best; usage"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "caer_jax.report", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert (result.returncode, result.stdout[: len(out)], result.stderr[: len(err)]) == (
            code,
            out,
            err,
        )
