"""Faults: a killed run resumes to the same parameters, SIGTERM saves at the signal's step, a
damaged newest checkpoint falls back to the previous one (and still ends at the same parameters),
a non-finite loss stops the run with the step and clips named or, with skip_nonfinite, is skipped
and counted, and an incompatible config is refused."""

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_runs

from caer_jax import checkpoint, sharding
from caer_jax import state as state_lib
from caer_jax.data import pipeline, prepare
from caer_jax.models import caer

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4  # 32 train clips / batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
# A learning rate of 1e30 makes the first step's update ~1e30, so that the next forward pass
# overflows: the non-finite steps of these tests.
HUGE_LR = ("--config.optim.lr.temporal=1e30", "--config.optim.lr.image_encoder=1e30")


def fault_overrides(root: Path) -> dict:
    return tiny_runs.overrides(
        root, **{"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 3}
    )


def fault_config(root: Path):
    return tiny_runs.config(fault_overrides(root))


def start_training(root: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "caer_jax.train",
            f"--config={REPO / 'configs/synthetic_tiny.py:scratch'}",
            f"--workdir={workdir}",
            *tiny_runs.flags(fault_overrides(root)),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def saved_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def wait_for_step(proc: subprocess.Popen, workdir: Path, step: int) -> None:
    deadline = time.time() + 300
    while max(saved_steps(workdir), default=0) < step:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def saved_state(config, workdir: Path, step: int):
    """The whole train state saved at `step` (host numpy) and its meta."""
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    abstract = state_lib.abstract_state(model, config, STEPS_PER_EPOCH)
    mesh = sharding.make_mesh(config.mesh)
    target = checkpoint.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    state, meta = ckpts.restore(step, target)
    ckpts.close()
    return jax.device_get(state), meta


def final_params(config, workdir: Path, step: int):
    state, meta = saved_state(config, workdir, step)
    return state.params, meta


def assert_same_params(params, expected, what: str) -> None:
    jax.tree.map(functools.partial(np.testing.assert_array_equal, err_msg=what), params, expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    config = fault_config(root)
    prepare.prepare_data(config)
    workdir = root / "reference"
    finish(start_training(root, workdir))
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    return config, root, params


@pytest.mark.parametrize("kill_after", [3, 4], ids=["mid-epoch", "epoch-end"])
def test_sigkill_then_resume_gives_the_same_parameters(reference, kill_after):
    config, root, expected = reference
    workdir = root / f"killed-{kill_after}"
    proc = start_training(root, workdir)
    wait_for_step(proc, workdir, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The run goes on while the test polls: the newest checkpoint may be past kill_after.
    what = f"killed after step {kill_after}, checkpoints then: {saved_steps(workdir)}"
    assert max(saved_steps(workdir)) < TOTAL_STEPS, what
    out = finish(start_training(root, workdir))
    assert re.search(r"resumed from step \d+", out), what
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    assert_same_params(params, expected, what)


def test_sigterm_saves_at_the_signal_step_exits_cleanly_and_resumes(reference):
    config, root, expected = reference
    workdir = root / "preempted"
    proc = start_training(root, workdir)
    wait_for_step(proc, workdir, 2)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "preempted" in out
    match = re.search(r"preempted: saved step (\d+)", out)
    assert match, out[-3000:]
    assert max(saved_steps(workdir)) == int(match.group(1)) < TOTAL_STEPS
    # Resumed with grain worker processes, whose iterator state differs from the saved one: the
    # data restarts at the step, and the run ends where the uninterrupted one did.
    out = finish(start_training(root, workdir, "--config.data.worker_count=2"))
    assert f"starting it at step {match.group(1)}" in out
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(reference):
    config, root, expected = reference
    workdir = root / "damaged"
    proc = start_training(root, workdir)
    wait_for_step(proc, workdir, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = max(saved_steps(workdir))
    for path in (workdir / "checkpoints" / str(newest) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    out = finish(start_training(root, workdir))
    assert f"checkpoints/{newest} cannot be restored" in out
    assert (workdir / "checkpoints" / f"{newest}.damaged").is_dir()
    assert f"resumed from step {newest - 1}" in out
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    assert_same_params(params, expected, f"resumed from step {newest - 1}")


def test_nonfinite_loss_names_the_step_and_keeps_the_last_checkpoint(reference):
    config, root, _ = reference
    workdir = root / "nan"
    proc = start_training(root, workdir, *HUGE_LR)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    match = re.search(
        r"non-finite loss \S+ or gradient norm \S+ at step (\d+); clips of this "
        r"process's batch: \[('clips/\d+',? ?)+\]",
        out,
    )
    assert match, out[-3000:]
    bad_step = int(match.group(1))
    assert max(saved_steps(workdir), default=0) == bad_step - 1
    if bad_step > 1:
        params, _ = final_params(config, workdir, bad_step - 1)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_skip_nonfinite_skips_and_counts_the_steps_and_training_goes_on(reference):
    config, root, _ = reference
    workdir = root / "skip"
    out = finish(
        start_training(
            root,
            workdir,
            *HUGE_LR,
            "--config.train.skip_nonfinite=True",
            f"--config.train.keep_checkpoints={TOTAL_STEPS}",
        )
    )
    # Training went on to the end and evaluated the best checkpoint.
    assert saved_steps(workdir) == list(range(1, TOTAL_STEPS + 1))
    assert (workdir / "metrics.json").is_file()
    states = {step: saved_state(config, workdir, step) for step in saved_steps(workdir)}
    skipped = []
    for step in range(2, TOTAL_STEPS + 1):
        (before, _), (after, _) = states[step - 1], states[step]
        assert int(after.step) == step  # the counter advances either way (aligned with the data)
        same = jax.tree.leaves(jax.tree.map(np.array_equal, after.params, before.params))
        if all(same):
            skipped.append(step)
            # a skipped step changes neither the parameters nor the optimizer state
            assert_same_params(after.opt_state, before.opt_state, f"skipped step {step}")
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(after.params)), step
    count = states[TOTAL_STEPS][1]["skipped_nonfinite_steps"]
    print(f"skipped steps {skipped}, counted {count}")
    assert skipped and count == len(skipped)
    match = re.search(r"non-finite step (\d+)", out)
    assert match and int(match.group(1)) == skipped[0], out[-3000:]


def test_incompatible_config_is_refused(reference):
    config, root, _ = reference
    other = fault_config(root)
    other.model.temporal.mlp_dim = 64
    model, _ = caer.build_model(other.model, num_frames=other.data.num_segments)
    abstract = state_lib.abstract_state(model, other, STEPS_PER_EPOCH)
    ckpts = checkpoint.Checkpoints(root / "reference", read_only=True)
    with pytest.raises(
        checkpoint.IncompatibleCheckpointError,
        match="config.model.temporal.mlp_dim=128, the config now has 64",
    ):
        ckpts.restore(TOTAL_STEPS, abstract, config=other)


def test_parameters_restore_alone_without_the_optimizer_state(reference):
    # What eval and predict load: the same parameters as the whole state holds, on any mesh.
    config, root, expected = reference
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    abstract = state_lib.abstract_params(model, config)
    mesh = sharding.make_mesh(config.mesh)
    target = checkpoint.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
    ckpts = checkpoint.Checkpoints(root / "reference", read_only=True)
    params, meta = ckpts.restore_params(TOTAL_STEPS, target, config=config)
    ckpts.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
    assert meta == final_params(config, root / "reference", TOTAL_STEPS)[1]


def test_steps_per_epoch_is_what_the_tests_assume(reference):
    config, _, _ = reference
    assert pipeline.steps_per_epoch(config) == STEPS_PER_EPOCH
