"""The whole system at small scale: synthetic RAER -> TFDS -> grain -> CLIP-CAER -> 8-device
training with checkpoints -> evaluation from the checkpoint, through the library and the CLIs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import tiny_runs

from caer_jax import checkpoint, evaluation, train

REPO = Path(__file__).resolve().parents[1]


def small_config(root: Path, streams: str = "both"):
    return tiny_runs.config(tiny_runs.overrides(root), "" if streams == "both" else streams)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    config = small_config(root)
    workdir = root / "run"
    results = train.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_training_writes_checkpoints_metrics_and_plots(trained):
    config, workdir, results = trained
    assert jax.device_count() == 8
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert 0.0 <= metrics["uar"] <= 100.0 and 0.0 <= metrics["war"] <= 100.0
    assert metrics["uar"] == pytest.approx(results["uar"])
    # every test clip exactly once
    test_lines = (Path(config.data.synthetic.manual_dir) / "test.txt").read_text().splitlines()
    assert metrics["num_clips"] == len(test_lines)
    assert sum(row["support"] for row in metrics["per_class"].values()) == len(test_lines)
    # bootstrap intervals around the split's figures, and the config the checkpoint was trained with
    intervals = metrics["bootstrap"]
    assert intervals["resamples"] == config.eval.bootstrap_resamples
    assert intervals["war"][0] <= metrics["war"] <= intervals["war"][1]
    assert 0.0 <= intervals["uar"][0] <= intervals["uar"][1] <= 100.0
    assert metrics["train_config"] == json.loads(json.dumps(config.to_dict()))
    for name in ("curves.png", "confusion_matrix.png", "predictions.csv", "param_groups.txt"):
        assert (workdir / name).stat().st_size > 0, name
    assert list((workdir / "tensorboard").iterdir())
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    assert ckpts.manager.latest_step() == 2 * (32 // config.train.batch_size)
    ckpts.close()
    groups = (workdir / "param_groups.txt").read_text()
    assert "group=frozen" in groups and "group=temporal" in groups


def test_eval_cli_restores_the_checkpoint_on_one_device(trained, tmp_path):
    config, workdir, results = trained
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "caer_jax.eval",
            f"--config={REPO / 'configs/synthetic_tiny.py'}",
            f"--workdir={workdir}",
            "--step=best",
            f"--config.data.data_dir={config.data.data_dir}",
            f"--config.data.synthetic.manual_dir={config.data.synthetic.manual_dir}",
            f"--config.data.synthetic.num_clips={config.data.synthetic.num_clips}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"UAR {results['uar']:.2f}" in result.stdout


def test_eval_without_checkpoints_names_the_directory(tmp_path):
    config = small_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in {tmp_path}"):
        evaluation.evaluate_checkpoint(config, tmp_path, step="best", split="test")


def test_training_on_a_missing_dataset_says_how_to_build_it(tmp_path):
    config = small_config(tmp_path)
    config.data.synthetic.enabled = False
    with pytest.raises(FileNotFoundError, match="tfds build tfds_raer/raer"):
        train.train_and_evaluate(config, tmp_path / "run")


def test_synthetic_folder_of_another_size_is_not_reused(trained):
    config, _, _ = trained
    other = small_config(Path(config.data.synthetic.manual_dir).parent)
    other.data.synthetic.num_clips = 60
    with pytest.raises(
        ValueError, match="holds 40 synthetic clips but config.data.synthetic.num_clips is 60"
    ):
        train.train_and_evaluate(other, Path(config.data.synthetic.manual_dir).parent / "other")
