"""The launch scripts' --dry-run prints what they would run; bad arguments are refused;
with_jemalloc.sh removes XLA:CPU's per-step page faults."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _run(*args, env=None):
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, env=env
    )


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


def test_local_stops_the_others_when_one_process_fails(tmp_path):
    # A stand-in interpreter: process 1 fails at once, process 0 would wait ten minutes for it.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        '#!/usr/bin/env bash\n[[ $JAX_PROCESS_ID == 1 ]] && { echo "cannot start"; exit 7; }\n'
        "exec sleep 600\n"
    )
    fake_python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), LOG_DIR=str(tmp_path), CAER_JEMALLOC="none")
    out = _run(LAUNCH / "local.sh", "2", "caer_jax.train", env=env)  # times out if not stopped
    assert out.returncode == 1, out.stderr
    assert "process 1 failed (status 7)" in out.stderr and "cannot start" in out.stderr, out.stderr
    assert "process 0 stopped (status 137)" in out.stderr, out.stderr


def test_slurm_dry_run_uses_srun_with_auto_detection():
    out = _run(
        LAUNCH / "slurm_gpu.sbatch", "--dry-run", "--config=configs/clip_caer_b32.py", "--workdir=w"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun ")
    assert "CAER_DISTRIBUTED=auto" in out.stdout
    assert "-m caer_jax.train --config=configs/clip_caer_b32.py --workdir=w" in out.stdout


def test_tpu_pod_dry_run_plans_creates_installs_and_trains_on_all_workers():
    out = _run(
        LAUNCH / "tpu_pod.sh",
        "--dry-run",
        "pod",
        "zone-a",
        "v4-32",
        "--",
        "--config=configs/clip_caer_b32.py",
        "--workdir=gs://b/r",
        "--config.train.batch_size=64",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    # The plan compiles the config with its overrides, not the other training flags.
    assert lines[0].endswith(
        "-m caer_jax.plan --topology=v4-32 --programs=train --fail_if_not_fits "
        "--config=configs/clip_caer_b32.py --config.train.batch_size=64"
    )
    assert lines[1].startswith(
        "gcloud compute tpus tpu-vm create pod --zone=zone-a --accelerator-type=v4-32"
    )
    assert all("--worker=all" in line for line in lines[2:])
    assert "pip install" in lines[2]
    assert "CAER_DISTRIBUTED=auto" in lines[3]
    assert "caer_jax.train --config=configs/clip_caer_b32.py --workdir=gs://b/r" in lines[3]


def test_tpu_pod_no_plan_skips_the_plan():
    out = _run(LAUNCH / "tpu_pod.sh", "--no-plan", "--dry-run", "pod", "zone-a", "v4-8", "--")
    assert out.returncode == 0, out.stderr
    assert "caer_jax.plan" not in out.stdout
    assert out.stdout.startswith("gcloud compute tpus tpu-vm create pod")


def test_tpu_pod_stops_before_any_pod_when_the_step_does_not_fit(tmp_path):
    # Stand-ins: an interpreter whose plan refuses as caer_jax.plan does (its figures, one error
    # line, status 2; tests/test_plan.py runs the real refusal), and a gcloud that records calls.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        '#!/usr/bin/env bash\necho "plan $*"\necho "| train | 64 | no: needs 40.0 of 16.9 GB |"\n'
        'echo "error: the train step of batch 64 needs 40.0 GB per chip" >&2\nexit 2\n'
    )
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.parent.mkdir()
    gcloud.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/gcloud_calls\n')
    for script in (fake_python, gcloud):
        script.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), PATH=f"{gcloud.parent}:{os.environ['PATH']}")
    out = _run(
        LAUNCH / "tpu_pod.sh", "pod", "zone-a", "v5litepod-16", "--", "--config=c.py", env=env
    )
    assert out.returncode == 2
    assert "plan -m caer_jax.plan --topology=v5litepod-16" in out.stdout
    assert "no: needs 40.0 of 16.9 GB" in out.stdout and "error: the train step" in out.stderr
    assert not (tmp_path / "gcloud_calls").exists()


def test_tpu_pod_refuses_missing_separator():
    out = _run(LAUNCH / "tpu_pod.sh", "pod", "zone-a", "v4-32", "--workdir=x")
    assert out.returncode == 2 and "usage" in out.stderr


def _installed_library(name: str) -> str | None:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if line.strip().startswith(f"{name} "):
            return line.split("=>")[-1].strip()
    return None


# A jitted op on a 64 MB array: XLA:CPU mallocs its 64 MB output every call and frees it when the
# result is dropped. Prints the minor page faults per call over 20 calls after 5 warm-up calls
# (jemalloc keeps an extent per arena, and a call may land on a thread whose arena is new).
_FAULTS_PER_CALL = """
import resource
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: x * 2 + 1)
for _ in range(5):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""
PAGES_PER_OUTPUT = 4096 * 4096 * 4 // 4096


def _faults_per_call(jemalloc: str) -> int:
    env = {"PATH": os.environ["PATH"], "JAX_PLATFORMS": "cpu", "CAER_JEMALLOC": jemalloc}
    out = _run(LAUNCH / "with_jemalloc.sh", sys.executable, "-c", _FAULTS_PER_CALL, env=env)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    _installed_library("libjemalloc.so.2") is None,
    reason="libjemalloc.so.2 not installed (apt-get install libjemalloc2)",
)
def test_with_jemalloc_stops_per_call_page_faults():
    # The premise: with the system malloc every call faults its whole output in again.
    assert _faults_per_call("none") >= PAGES_PER_OUTPUT // 2
    assert _faults_per_call(_installed_library("libjemalloc.so.2")) < PAGES_PER_OUTPUT // 8


def test_with_jemalloc_preloads_the_library_and_passes_the_exit_status():
    # Any shared library shows the wiring (zlib is everywhere); the allocator is the test above.
    lib = _installed_library("libz.so.1")
    env = {"PATH": os.environ["PATH"], "CAER_JEMALLOC": str(lib), "MALLOC_CONF": "narenas:2"}
    show = 'echo "$LD_PRELOAD|$MALLOC_CONF"; grep -c "$(basename "$LD_PRELOAD")" /proc/self/maps; exit 3'
    out = _run(LAUNCH / "with_jemalloc.sh", "bash", "-c", show, env=env)
    assert out.returncode == 3
    preload, maps_lines = out.stdout.split()
    assert preload == f"{lib}|narenas:2"  # a MALLOC_CONF the user set is kept
    assert int(maps_lines) > 0


def test_with_jemalloc_refuses_a_missing_library_and_runs_plainly_when_disabled():
    env = {"PATH": os.environ["PATH"], "CAER_JEMALLOC": "/no/such/libjemalloc.so.2"}
    out = _run(LAUNCH / "with_jemalloc.sh", "true", env=env)
    assert out.returncode == 2 and "/no/such/libjemalloc.so.2: no such file" in out.stderr
    env["CAER_JEMALLOC"] = "none"
    out = _run(LAUNCH / "with_jemalloc.sh", "bash", "-c", 'echo "[$LD_PRELOAD]"', env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]"
    assert _run(LAUNCH / "with_jemalloc.sh").returncode == 2


def _fake_ldconfig(tmp_path: Path, listing_head: str) -> dict:
    """An environment whose `ldconfig -p` prints `listing_head` and then 2 MB of other libraries,
    far more than a pipe holds, so a reader that stops early breaks the pipe."""
    fake = tmp_path / "bin/ldconfig"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s' '{listing_head}'\n"
        'for i in $(seq 40000); do echo "  libother$i.so (libc6,x86-64) => /lib/libother$i.so"; done\n'
    )
    fake.chmod(0o755)
    return {"PATH": f"{fake.parent}:{os.environ['PATH']}"}


def test_with_jemalloc_finds_the_library_early_in_a_long_ldconfig_listing(tmp_path):
    lib = _installed_library("libz.so.1")
    env = _fake_ldconfig(tmp_path, f"\tlibjemalloc.so.2 (libc6,x86-64) => {lib}\n")
    out = _run(LAUNCH / "with_jemalloc.sh", "bash", "-c", 'echo "$LD_PRELOAD"; exit 3', env=env)
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == lib


def test_with_jemalloc_runs_plainly_with_a_note_when_ldconfig_lists_none(tmp_path):
    env = _fake_ldconfig(tmp_path, "")
    out = _run(LAUNCH / "with_jemalloc.sh", "bash", "-c", 'echo "[$LD_PRELOAD]"', env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]"
    assert "libjemalloc.so.2 not found" in out.stderr


def test_seeds_dry_run_gives_each_seed_its_workdir():
    out = _run(
        LAUNCH / "seeds.sh",
        "--dry-run",
        "42,43,44",
        "runs/tiny",
        "sbatch",
        "job.sbatch",
        "--config=c",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"sbatch job.sbatch --config=c --config.seed={s} --workdir=runs/tiny/seed_{s}"
        for s in (42, 43, 44)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["1,x", "w", "cmd"], "SEEDS must be comma-separated"),
        (["1,1", "w", "cmd"], "lists a seed twice"),
        (["1", "w", "cmd", "--workdir=other"], "sets the workdir and the seed"),
        (["1", "w"], "usage"),
    ],
)
def test_seeds_refuses_bad_arguments(args, message):
    out = _run(LAUNCH / "seeds.sh", *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_seeds_runs_in_sequence_and_stops_at_the_first_failure(tmp_path):
    # A stand-in training command: records its arguments, fails for seed 2.
    fake = tmp_path / "train"
    fake.write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls"}\n'
        '[[ "$*" == *seed=2* ]] && exit 3\nexit 0\n'
    )
    fake.chmod(0o755)
    out = _run(LAUNCH / "seeds.sh", "1,2,3", "w", fake, "--config=c")
    assert out.returncode == 3 and "seed 2 failed (status 3)" in out.stderr, out.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        "--config=c --config.seed=1 --workdir=w/seed_1",
        "--config=c --config.seed=2 --workdir=w/seed_2",
    ]
