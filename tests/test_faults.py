"""Faults: a killed run resumes to the same parameters, SIGTERM saves at the signal's step, a
damaged newest checkpoint falls back to the previous one (and still ends at the same parameters),
a non-finite loss stops the run with the step and clips named or, with skip_nonfinite, is skipped
and counted, an incompatible config is refused, and a damaged dataset file stops the run with the
checkpoints kept, to resume exactly once the file is restored.

The kills are placed, not raced: tests/killed_training.py kills the training process itself at
a chosen step and moment."""

import ast
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_runs

from caer_jax import checkpoint, errors, sharding
from caer_jax import state as state_lib
from caer_jax.data import pipeline, prepare
from caer_jax.models import caer

REPO = Path(__file__).resolve().parents[1]

# Training runs in subprocesses, killed and resumed: end to end, left out of `make test-fast`.
pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 4  # 32 train clips / batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
# A learning rate of 1e30 makes the first step's update ~1e30, so that the next forward pass
# overflows: the non-finite steps of these tests.
HUGE_LR = ("--config.optim.lr.temporal=1e30", "--config.optim.lr.image_encoder=1e30")
# The same from the second epoch on (learning rates 1e-3 x gamma after epoch 1): step 5's update
# makes step 6 the first non-finite one.
HUGE_LR_FROM_EPOCH_2 = ("--config.optim.gamma=1e33",)


def fault_overrides(root: Path) -> dict:
    return tiny_runs.overrides(
        root, **{"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 3}
    )


def fault_config(root: Path):
    return tiny_runs.config(fault_overrides(root))


def start_training(
    root: Path, workdir: Path, *extra: str, kill_at: tuple[int, str] | None = None
) -> subprocess.Popen:
    """caer_jax.train on the fault config; `kill_at` (step, moment): killed there by
    tests/killed_training.py."""
    # PYTHONPATH: the config files import `configs`, which `python -m` finds in the working
    # directory but a script (killed_training.py) does not: its path starts at tests/.
    # Two devices: a run's data-parallel mesh and checkpoints are sharded as on eight, and each
    # save (every step here) writes a quarter of the shards (24 -> 18 s a run on 2 cores).
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(REPO)
    )
    if kill_at is None:
        program = ["-m", "caer_jax.train"]
    else:
        program = [str(REPO / "tests/killed_training.py"), str(kill_at[0]), kill_at[1]]
    return subprocess.Popen(
        [
            sys.executable,
            *program,
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


def kill(root: Path, workdir: Path, step: int, moment: str) -> list[str]:
    """Trains until killed at `step` and `moment` (tests/killed_training.py); returns what the
    checkpoint directory then holds."""
    proc = start_training(root, workdir, kill_at=(step, moment))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out[-4000:]
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "step,moment,resume_from",
    [(3, "writing", 2), (4, "saved", 4)],
    ids=["mid-epoch-while-writing", "epoch-end-after-saving"],
)
def test_sigkill_then_resume_gives_the_same_parameters(reference, step, moment, resume_from):
    config, root, expected = reference
    workdir = root / f"killed-{step}-{moment}"
    held = kill(root, workdir, step, moment)
    what = f"killed at step {step} ({moment}); checkpoints then: {held}"
    assert max(saved_steps(workdir)) == resume_from, what
    # Killed while writing: step 3's checkpoint was begun (orbax's temporary directory) and
    # never finalized.
    assert any(name.startswith(f"{step}.") for name in held) == (moment == "writing"), what
    out = finish(start_training(root, workdir))
    assert f"resumed from step {resume_from} " in out, what
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
    kill(root, workdir, 3, "saved")
    newest = max(saved_steps(workdir))
    assert newest == 3
    for path in (workdir / "checkpoints" / str(newest) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    out = finish(start_training(root, workdir))
    assert f"checkpoints/{newest} cannot be restored" in out
    assert (workdir / "checkpoints" / f"{newest}.damaged").is_dir()
    assert f"resumed from step {newest - 1}" in out
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    assert_same_params(params, expected, f"resumed from step {newest - 1}")


def test_nonfinite_step_read_late_names_its_step_and_batch_and_keeps_the_last_checkpoint(
    reference,
):
    """Metrics are read at log steps and epoch ends only: here steps 4 and 8. Step 6 is the
    first non-finite one; its flag is read at step 8, and the error names step 6 and the clips
    of step 6's batch. No checkpoint follows step 4's."""
    config, root, _ = reference
    workdir = root / "nan"
    lazy = ("--config.train.checkpoint_every_steps=0", "--config.train.log_every_steps=4")
    proc = start_training(root, workdir, *lazy, *HUGE_LR_FROM_EPOCH_2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    match = re.search(
        r"non-finite loss \S+ or gradient norm \S+ at step (\d+); clips of this "
        r"process's batch: (\[[^]]*\])",
        out,
    )
    assert match, out[-3000:]
    assert int(match.group(1)) == 6, out[-3000:]
    assert re.findall(r"step (\d+)/8 epoch", out) == ["4"]  # the only step logged
    batches = pipeline.train_iterator(
        config, seed=config.seed, process_index=0, process_count=1, start_step=5
    )
    ids = pipeline.video_ids(config, config.data.train_split)
    assert ast.literal_eval(match.group(2)) == [ids[i] for i in next(batches)["index"]]
    batches.close()
    assert saved_steps(workdir) == [4]
    params, _ = final_params(config, workdir, 4)
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


def test_a_damaged_dataset_file_stops_the_run_and_the_restored_file_resumes_exactly(reference):
    config, root, expected = reference
    workdir = root / "damaged_data"
    shutil.copytree(root / "reference" / "checkpoints", workdir / "checkpoints")
    for step in saved_steps(workdir):
        if step > TOTAL_STEPS - 2:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    data_dir = root / "damaged_tfds"
    shutil.copytree(root / "tfds", data_dir)
    (shard,) = data_dir.glob("raer/64px/*/raer-train.array_record-*")
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    # The read fails in a grain worker process; the error crosses to the main process whole.
    proc = start_training(
        root, workdir, f"--config.data.data_dir={data_dir}", "--config.data.worker_count=1"
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("error:")]
    assert re.match(
        rf"error: {re.escape(str(shard))}: record \d+ \(frame \d+ of clip clips/\d+, record \d+ "
        r"of the raer/64px train split in .*\) cannot be read \(.*\); the build is damaged: "
        "restore the file from a copy",
        line,
    ), line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    shard.write_bytes(intact)
    out = finish(start_training(root, workdir, f"--config.data.data_dir={data_dir}"))
    assert f"resumed from step {TOTAL_STEPS - 2}" in out
    params, _ = final_params(config, workdir, TOTAL_STEPS)
    assert_same_params(params, expected, "resumed once the dataset file was restored")


def test_a_data_error_while_restoring_sets_no_checkpoint_aside(reference):
    # With the feature cache, a missing cache file is found as the iterator is made inside the
    # restore: that is the data's fault, not the checkpoint's.
    _, root, _ = reference
    workdir = root / "data_error_on_restore"
    shutil.copytree(root / "reference" / "checkpoints", workdir / "checkpoints")
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())

    def restore(step):
        raise errors.DamagedDataError(f"chunk-00000.face.array_record: missing (step {step})", "")

    ckpts = checkpoint.Checkpoints(workdir)
    with pytest.raises(errors.DamagedDataError, match=f"missing \\(step {TOTAL_STEPS}\\)"):
        ckpts.restore_newest_intact(restore)
    ckpts.close()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
