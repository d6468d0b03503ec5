"""The launch scripts' --dry-run prints what they would run; bad arguments are refused."""

import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def test_local_dry_run_starts_n_processes_on_loopback():
    out = _run(
        LAUNCH / "local.sh",
        "--dry-run",
        "--devices-per-process",
        "2",
        "3",
        "caer_jax.train",
        "--config=c",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=3" in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:" in line
        assert "--xla_force_host_platform_device_count=2" in line
        assert line.endswith(f"-m caer_jax.train --config=c > ./local-{i}.log 2>&1 &")


@pytest.mark.parametrize("args", [["0", "caer_jax.train"], ["two", "caer_jax.train"], ["2"]])
def test_local_refuses_bad_arguments(args):
    out = _run(LAUNCH / "local.sh", *args)
    assert out.returncode == 2
    assert "usage" in out.stderr or "positive integer" in out.stderr


def test_slurm_dry_run_uses_srun_with_auto_detection():
    out = _run(
        LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--config=configs/clip_caer_b32.py", "--workdir=w"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun ")
    assert "CAER_DISTRIBUTED=auto" in out.stdout
    assert "-m caer_jax.train --config=configs/clip_caer_b32.py --workdir=w" in out.stdout


def test_tpu_pod_dry_run_creates_installs_and_trains_on_all_workers():
    out = _run(
        LAUNCH / "tpu_pod.sh", "--dry-run", "pod", "zone-a", "v4-32", "--", "--workdir=gs://b/r"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(
        "gcloud compute tpus tpu-vm create pod --zone=zone-a --accelerator-type=v4-32"
    )
    assert all("--worker=all" in line for line in lines[1:])
    assert "pip install" in lines[1]
    assert "CAER_DISTRIBUTED=auto" in lines[2] and "caer_jax.train --workdir=gs://b/r" in lines[2]


def test_tpu_pod_refuses_missing_separator():
    out = _run(LAUNCH / "tpu_pod.sh", "pod", "zone-a", "v4-32", "--workdir=x")
    assert out.returncode == 2 and "usage" in out.stderr
