"""Several hosts on one machine: `launch/local.sh 2 --devices-per-process 2` trains, checkpoints
and evaluates like one process with 4 devices; its mid-epoch checkpoint resumes in one process,
and in two, to the same result; evaluation of that checkpoint over 2 processes and over 1, 2 and 8
devices of one process counts every test clip once with the same metrics; the feature cache built
by 2 processes (each its own chunks, joined by barriers) holds what one process builds, and trains
the same.

The synthetic dataset has 42 clips: 33 train (4 steps of 8, one clip dropped) and 9 test, so the
eval batch of 8 leaves a last batch of 1 clip and 7 padding rows.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_runs

from caer_jax import distributed, evaluation, sharding, trainer
from caer_jax.data import feature_cache, prepare

REPO = Path(__file__).resolve().parents[1]

# Training runs of two processes each: end to end, left out of `make test-fast`.
pytestmark = pytest.mark.slow
NUM_CLIPS = 42
NUM_TEST = 9
EVAL_BATCH = 8
# Both runs use the same (4, 1) mesh; the collectives differ (gloo across processes vs in-process),
# and so may the order of float additions. Measured: identical to the 6 decimals of
# predictions.csv without a learning-rate warm-up, 1.9e-5 apart with the tiny default's one-epoch
# warm-up. A batch on the wrong process or a missing gradient would move them by far more.
PROB_TOL = 1e-4


def tiny_overrides(root: Path) -> dict:
    return tiny_runs.overrides(
        root,
        NUM_CLIPS,
        **{
            "train.num_epochs": 1,
            "train.log_every_steps": 1,
            "train.eval_batch_size": EVAL_BATCH,
            "train.checkpoint_every_steps": 2,  # a mid-epoch checkpoint at step 2 of 4
        },
    )


def tiny_config(root: Path):
    return tiny_runs.config(tiny_overrides(root))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_sh(root: Path, module: str, workdir: Path, *extra: str, env: dict | None = None) -> None:
    args = tiny_runs.flags(tiny_overrides(root))
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(root), **(env or {}))
    result = subprocess.run(
        [
            str(REPO / "launch/local.sh"),
            "--devices-per-process",
            "2",
            "--port",
            str(free_port()),
            "2",
            module,
            f"--config={REPO / 'configs/synthetic_tiny.py:scratch'}",
            f"--workdir={workdir}",
            *args,
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "\n".join((root / f"local-{i}.log").read_text()[-3000:] for i in range(2))
    assert result.returncode == 0, result.stderr[-3000:] + logs


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_results(results: dict, ours: Path, theirs: Path, what: str) -> None:
    """The in-process run's `results` and predictions in `ours` match the run in `theirs`."""
    metrics = json.loads((theirs / "metrics.json").read_text())
    for key in ("uar", "war", "num_clips", "confusion_matrix"):
        assert metrics[key] == results[key], key
    our_probs = tiny_runs.probabilities(tiny_runs.read_predictions(ours / "predictions.csv"))
    their_probs = tiny_runs.probabilities(tiny_runs.read_predictions(theirs / "predictions.csv"))
    print(f"{what}: max |d prob| {np.max(np.abs(our_probs - their_probs)):.2e}")
    np.testing.assert_allclose(our_probs, their_probs, rtol=0, atol=PROB_TOL)


_MAKE_MESH = sharding.make_mesh


def on_devices(monkeypatch, count: int) -> None:
    """sharding.make_mesh (used by train and evaluation) over the first `count` devices."""
    monkeypatch.setattr(
        sharding,
        "make_mesh",
        lambda mesh_config, devices=None: _MAKE_MESH(mesh_config, jax.devices()[:count]),
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    config = tiny_config(root)
    prepare.prepare_data(config)  # both processes only read the dataset
    test_ids = [line.split()[0] for line in (root / "raer/test.txt").read_text().splitlines()]
    assert len(test_ids) == NUM_TEST and NUM_TEST % EVAL_BATCH != 0
    workdir = root / "two_processes"
    local_sh(root, "caer_jax.train", workdir)
    return config, root, workdir, test_ids


def test_two_processes_train_checkpoint_and_evaluate(two_process_run):
    _, _, workdir, test_ids = two_process_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["num_clips"] == NUM_TEST
    assert sum(row["support"] for row in metrics["per_class"].values()) == NUM_TEST
    predictions = tiny_runs.read_predictions(workdir / "predictions.csv")
    assert sorted(predictions) == sorted(test_ids)  # every test clip once
    assert saved_steps(workdir) == [2, 4]
    assert list((workdir / "tensorboard").iterdir())  # written by process 0


def test_two_processes_match_one_process_with_four_devices(two_process_run, tmp_path, monkeypatch):
    config, root, workdir, _ = two_process_run
    on_devices(monkeypatch, 4)
    single = tmp_path / "one_process"
    results = trainer.train_and_evaluate(config, single)
    assert_same_results(results, single, workdir, "2 processes vs 1")


def test_mid_epoch_checkpoint_of_two_processes_resumes_in_one(
    two_process_run, tmp_path, monkeypatch
):
    # Each process saved its own iterator position; one process splits the global batches
    # differently and starts a new iterator at the step instead.
    config, _, workdir, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints/4")
    assert saved_steps(resumed) == [2]
    on_devices(monkeypatch, 4)
    results = trainer.train_and_evaluate(config, resumed)
    assert_same_results(results, resumed, workdir, "resumed in 1 process vs 2 throughout")


def test_mid_epoch_checkpoint_of_two_processes_resumes_in_two(two_process_run, tmp_path):
    # Each process restores its own iterator position (the state it saved) and its shards.
    # Process 1 reaches the first step 35 s after process 0, as a slower host might: gloo gives
    # up connecting the processes after 30 s, so they wait for each other before the first step.
    _, root, workdir, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints/4")
    local_sh(root, "caer_jax.train", resumed, env={distributed.LATE_ENV: "train:1:35"})
    logs = (root / "local-0.log").read_text()
    assert f"resumed from step 2 in {resumed / 'checkpoints'}" in logs
    assert "train: process 1 arrives 35 s late" in (root / "local-1.log").read_text()
    assert saved_steps(resumed) == [2, 4]
    results = json.loads((resumed / "metrics.json").read_text())
    assert_same_results(results, resumed, workdir, "resumed in 2 processes vs 2 throughout")


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(two_process_run, tmp_path):
    # As a cluster's scheduler may signal one task first: jax.distributed's preemption service
    # makes every process save the same step and exit cleanly.
    _, root, _, _ = two_process_run
    workdir = tmp_path / "preempted"
    command = [
        *(str(REPO / "launch/local.sh"), "--devices-per-process", "2", "--port", str(free_port())),
        *("2", "caer_jax.train", f"--config={REPO / 'configs/synthetic_tiny.py:scratch'}"),
        *(f"--workdir={workdir}", *tiny_runs.flags(tiny_overrides(root))),
        "--config.train.num_epochs=3",  # 12 steps
    ]
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path))
    launcher = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE)
    logs = [tmp_path / f"local-{i}.log" for i in range(2)]
    deadline = time.time() + 300
    while "step 4/12" not in (logs[1].read_text() if logs[1].exists() else ""):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.2)
    second = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and f"--workdir={workdir}".encode() in _read(p / "cmdline")
        and b"JAX_PROCESS_ID=1\0" in _read(p / "environ")
    ]
    assert len(second) == 1
    os.kill(second[0], signal.SIGTERM)
    launcher.communicate(timeout=300)
    assert launcher.returncode == 0
    saved = [re.search(r"preempted: saved step (\d+)", log.read_text()) for log in logs]
    assert all(saved) and saved[0].group(1) == saved[1].group(1), [s and s[0] for s in saved]
    step = int(saved[0].group(1))
    assert 4 < step < 12 and saved_steps(workdir)[-1] == step
    local_sh(root, "caer_jax.train", workdir, "--config.train.num_epochs=3")
    assert f"resumed from step {step}" in (root / "local-0.log").read_text()
    assert json.loads((workdir / "metrics.json").read_text())["num_clips"] == NUM_TEST


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile, or one of another user
        return b""


def test_eval_counts_every_clip_once_on_any_topology(two_process_run, monkeypatch):
    config, root, workdir, test_ids = two_process_run
    local_sh(root, "caer_jax.eval", workdir, "--step=latest")
    reference = json.loads((workdir / "metrics.json").read_text())
    reference_probs = tiny_runs.probabilities(
        tiny_runs.read_predictions(workdir / "predictions.csv")
    )
    assert reference["num_clips"] == NUM_TEST and reference["step"] == 4
    for count in (1, 2, 8):
        on_devices(monkeypatch, count)
        summary = evaluation.evaluate_checkpoint(config, workdir, step="latest", split="test")
        assert summary["num_clips"] == NUM_TEST, count
        for key in ("uar", "war", "confusion_matrix"):
            assert summary[key] == reference[key], (count, key)
        predictions = tiny_runs.read_predictions(workdir / "predictions.csv")
        assert sorted(predictions) == sorted(test_ids)
        np.testing.assert_allclose(
            tiny_runs.probabilities(predictions), reference_probs, atol=PROB_TOL
        )


def test_two_processes_build_the_feature_cache_and_train_from_it_as_one(
    two_process_run, tmp_path, monkeypatch
):
    _, root, _, _ = two_process_run
    cached = {
        "model.freeze_image_encoder": True,
        "data.feature_cache.enabled": True,
        "data.rotation_degrees": 0.0,
        "data.feature_cache.clips_per_chunk": 4,  # 33 train clips: 9 chunks, 5 and 4 per process
    }
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    settings = {**cached, "data.feature_cache.dir": str(two / "cache")}
    local_sh(root, "caer_jax.train", two, *tiny_runs.flags(settings))
    config = tiny_runs.config({**tiny_overrides(root), **cached})
    config.data.feature_cache.dir = str(one / "cache")
    on_devices(monkeypatch, 4)
    results = trainer.train_and_evaluate(config, one)
    assert_same_results(results, one, two, "feature cache: 2 processes vs 1")

    files = sorted(p.relative_to(two / "cache") for p in (two / "cache").rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(one / "cache") for p in (one / "cache").rglob("*") if p.is_file()
    )
    assert len([f for f in files if f.parent.name == "train" and f.suffix == ".json"]) == 9 + 1
    for f in files:
        if f.suffix == ".json":  # chunk markers (labels, lengths, ids) and cache_info
            assert (two / "cache" / f).read_text() == (one / "cache" / f).read_text(), f
    for split in ("train", "test"):
        info = json.loads((one / "cache" / split / feature_cache.INFO_FILE).read_text())
        theirs, ours = (
            feature_cache.FeatureSource(d / "cache" / split, info["key"]) for d in (two, one)
        )
        assert len(theirs) == len(ours) > 0
        for i in range(len(ours)):
            for view in feature_cache.views(config.data.feature_cache.flipped):
                np.testing.assert_allclose(theirs[i][view], ours[i][view], rtol=0, atol=1e-5)
