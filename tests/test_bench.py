"""python -m caer_jax.bench: the figures it writes are consistent with each other."""

import json
import os
import subprocess
import sys

import pytest
import tiny_runs

from caer_jax import bench_end_to_end
from caer_jax.data import pipeline, prepare

# Benchmark runs: left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_bench_writes_consistent_model_figures(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--skip_paper", "--skip_data", "--repeats=1", "--matmul_size=512", f"--out={out}"]
    run = subprocess.run(
        [sys.executable, "-m", "caer_jax.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        # the session's cache directory (tests/conftest.py), not the user's
        env={
            "JAX_PLATFORMS": "cpu",
            "PATH": "/usr/bin:/bin",
            "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"],
        },
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["host_allocator"] in ("system", "jemalloc")
    tiny = figures["tiny"]
    assert tiny["batch_clips"] == 8 and tiny["train_step_flops"] > 1e9
    assert tiny["train_clips_per_s"] == pytest.approx(8 / tiny["train_step_s"])
    assert tiny["utilisation_of_matmul_rate"] == pytest.approx(
        tiny["train_step_flops"] / tiny["train_step_s"] / tiny["reference_matmul_flops_per_s"]
    )
    assert "paper_b32" not in figures and "pipeline" not in figures
    assert "tiny (float32, batch 8): train step" in run.stdout


def test_end_to_end_parts_on_a_small_build(tmp_path):
    """The pieces of `bench --end_to_end` that do not need the paper geometry: repeated records,
    the pipeline per worker count and the per-stage host costs, and their printout."""
    settings = tiny_runs.overrides(tmp_path, **{"train.batch_size": 2})
    config = tiny_runs.config(settings)
    prepare.prepare_data(config)
    repeated = bench_end_to_end.repeat_clips_of(
        tmp_path / "tfds", tmp_path / "repeated", 3, tfds_name=config.data.tfds_name
    )
    tripled = tiny_runs.config({**settings, "data.data_dir": str(repeated)})
    for split in ("train", "test"):
        n = pipeline.num_clips(config, split)
        assert pipeline.num_clips(tripled, split) == 3 * n
        ids = pipeline.video_ids(tripled, split)
        assert ids == pipeline.video_ids(config, split) * 3
        # the copies are whole clips: the last copy of the last clip reads its own frames
        clip = pipeline.clip_source(tripled, split)[3 * n - 1]
        assert clip.read_all() == pipeline.clip_source(config, split)[n - 1].read_all()

    # Enough batches that the window is bound by making them, not by the ones read ahead.
    in_process, one_worker = bench_end_to_end.pipeline_rates(tripled, [0, 1], num_batches=20)
    for rate, workers in ((in_process, 0), (one_worker, 1)):
        assert rate["worker_count"] == workers and rate["clips_per_s"] > 0
        assert rate["clips_per_cpu_second"] == pytest.approx(40 / rate["cpu_seconds"])
    # The worker's CPU time is counted: the clips cost about the same CPU in either place
    # (counting the main process alone would make the worker's clips look ~10x cheaper).
    assert one_worker["clips_per_cpu_second"] < 3 * in_process["clips_per_cpu_second"]
    stages = bench_end_to_end.stage_breakdown(tripled, num_clips=3)
    parts = ("read_parse", "decode", "transform")
    assert all(stages[f"{p}_ms_per_clip"] > 0 for p in parts)
    assert stages["total_ms_per_clip"] == pytest.approx(
        sum(stages[f"{p}_ms_per_clip"] for p in parts)
    )
