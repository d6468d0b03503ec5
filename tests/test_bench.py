"""python -m caer_jax.bench: the figures it writes are consistent with each other."""

import json
import subprocess
import sys

import pytest


def test_bench_writes_consistent_model_figures(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--skip_paper", "--skip_data", "--repeats=1", "--matmul_size=512", f"--out={out}"]
    run = subprocess.run(
        [sys.executable, "-m", "caer_jax.bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
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
