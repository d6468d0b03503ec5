"""The host loop that keeps an accelerator busy changes nothing but the timing.

- Batches prefetched onto the devices and metrics read only at log steps reach bitwise the
  parameters of a plain loop that moves each batch when it needs it and reads every step back.
- PendingMetrics gives back every step's metrics once, in step order, with its clips, and never
  leaves more than `max_in_flight` steps unfinished.
- finite_losses keeps the finite steps' losses and names the first non-finite step; checkpoints
  are due at their interval (not at a fresh run's first step), else only when forced.
- The prefetcher's checkpointed position is that of the batches used, not of those buffered.
- A second start with the same persistent compilation cache loads its programs from it, also
  with another seed (the dropout key is an argument of the train step, not a constant in it);
  the figures in speed.json cover the whole run, the final evaluation included.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_runs

from caer_jax import checkpoint, host_loop, sharding, trainer
from caer_jax import state as state_lib
from caer_jax.data import pipeline, prefetch, prepare
from caer_jax.models import caer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return tiny_runs.overrides(root, **{"train.num_epochs": 1, "train.log_every_steps": 3})


def _reference_parameters(config) -> dict:
    """A plain loop over the same steps: each batch moved when used, each step read back."""
    mesh = sharding.make_mesh(config.mesh)  # as the training run's
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    steps_per_epoch = pipeline.steps_per_epoch(config)
    setup = trainer.TrainingSetup.create(config, model, mesh, steps_per_epoch)
    state = setup.initial_state(config)
    batches = pipeline.train_iterator(config, seed=config.seed, process_index=0, process_count=1)
    for _ in range(steps_per_epoch * config.train.num_epochs):
        batch = pipeline.global_batch(next(batches), mesh)
        state, metrics = setup.step_fn(state, batch, setup.dropout_rng)
        assert jax.device_get(metrics)["finite"]
    batches.close()
    return jax.device_get(state.params)


@pytest.mark.slow  # two training runs
def test_prefetch_and_lazy_reads_give_the_plain_loops_parameters(settings, tmp_path):
    config = tiny_runs.config(settings)
    prepare.prepare_data(config)
    trainer.train_and_evaluate(config, tmp_path / "run")
    ckpts = checkpoint.Checkpoints(tmp_path / "run", read_only=True)
    step = ckpts.resolve_step("latest")
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    abstract = state_lib.abstract_params(model, config)
    mesh = sharding.make_mesh(config.mesh)
    target = checkpoint.with_shardings(abstract, sharding.tree_shardings(abstract, mesh))
    params, _ = ckpts.restore_params(step, target, config=config)
    ckpts.close()
    assert step == pipeline.steps_per_epoch(config) * config.train.num_epochs
    reference = _reference_parameters(config)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference)

    speed = json.loads((tmp_path / "run" / "speed.json").read_text())
    assert speed["steady_steps"] == step - 1 and speed["train_clips_per_s"] > 0
    assert speed["eval_clips"] > 0 and speed["checkpoint_blocked_seconds"] >= 0


def test_pending_metrics_are_read_once_in_step_order_with_their_clips():
    pending = host_loop.PendingMetrics(max_in_flight=2)
    assert pending.read() == []
    # Slow enough that a step is still running when the next two are added (~0.1 s on a CPU).
    slow = jax.jit(lambda x: jax.lax.fori_loop(0, 50, lambda _, y: jnp.tanh(y @ y), x))
    x = jnp.full((256, 256), 1e-3)
    added = []
    for step in range(1, 6):
        loss = slow(x).sum() + step  # dispatched, not finished
        added.append({"loss": loss, "finite": jnp.isfinite(loss) & (step != 3)})
        pending.add(step, added[-1], np.array([10 * step, 10 * step + 1]))
        # Adding a step waited for the one max_in_flight places back.
        assert all(m["finite"].is_ready() for m in added[:-2]), step
    records = pending.read()
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    for r, device in zip(records, added, strict=True):
        assert isinstance(r.metrics["loss"], np.ndarray) and r.metrics["loss"].shape == ()
        assert r.metrics["loss"] == float(device["loss"])
        np.testing.assert_array_equal(r.clips, [10 * r.step, 10 * r.step + 1])
    assert [bool(r.metrics["finite"]) for r in records] == [True, True, False, True, True]
    assert pending.read() == []  # read once
    pending.add(6, {"loss": jnp.float32(1.5), "finite": jnp.bool_(True)}, np.array([60]))
    assert [(r.step, float(r.metrics["loss"])) for r in pending.read()] == [(6, 1.5)]


def test_finite_losses_keep_the_finite_steps_and_name_the_first_bad_one():
    def record(step, loss):
        values = {"loss": np.float32(loss), "grad_norm": np.float32(1), "finite": np.isfinite(loss)}
        return host_loop.StepRecord(step, values, np.array([step]))

    records = [record(1, 0.5), record(2, np.nan), record(3, 0.25), record(4, np.inf)]
    losses, skipped = host_loop.finite_losses(records, skip_nonfinite=True, hint=str)
    assert losses == [0.5, 0.25] and [r.step for r in skipped] == [2, 4]
    hint = lambda r: f"clips {r.clips.tolist()}"  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"loss \(nan\) .* at step 2; clips \[2\]$"):
        host_loop.finite_losses(records, skip_nonfinite=False, hint=hint)


def test_checkpoints_are_due_at_the_interval_and_else_only_when_forced(tmp_path):
    import ml_collections

    every_3 = checkpoint.Checkpoints(tmp_path / "every_3", save_interval_steps=3)
    # Not at step 1 of a fresh run (orbax's save_interval_steps option would save it).
    assert [s for s in range(1, 10) if every_3.should_save(s)] == [3, 6, 9]
    every_3.close()
    ckpts = checkpoint.Checkpoints(tmp_path / "never")
    assert not any(ckpts.should_save(s) for s in range(1, 10))
    state = state_lib.TrainState(jnp.int32(2), {"w": jnp.ones(3)}, {"m": jnp.zeros(3)})
    config = ml_collections.ConfigDict({"seed": 0})
    ckpts.save(state, config=config, meta={})  # not due: nothing written
    ckpts.wait()
    assert ckpts.manager.all_steps() == []
    ckpts.save(state, config=config, meta={}, force=True)
    ckpts.wait()
    assert ckpts.manager.all_steps() == [2]
    ckpts.close()


def test_prefetch_state_is_the_position_of_the_batches_used(settings):
    config = tiny_runs.config(settings)
    prepare.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh)

    def host():
        return pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)

    plain = host()
    expected = [next(plain)["index"] for _ in range(5)]
    plain.close()

    ahead = prefetch.DevicePrefetch(host(), mesh, size=3)
    used = [next(ahead)[1]["index"] for _ in range(2)]  # 3 more are buffered by now
    state = ahead.get_state()
    ahead.close()
    resumed = host()
    resumed.set_state(state)
    after = [next(resumed)["index"] for _ in range(3)]
    resumed.close()
    for got, want in zip(used + after, expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # commands in their own processes
def test_a_second_start_loads_its_programs_from_the_compilation_cache(settings, tmp_path):
    cache = tmp_path / "cache"
    for name, seed in (("first", 42), ("second", 7)):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "caer_jax.train",
                "--config=configs/synthetic_tiny.py:scratch",
                f"--workdir={tmp_path / name}",
                f"--compilation_cache={cache}",
                *tiny_runs.flags(settings),
                f"--config.seed={seed}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    first = json.loads((tmp_path / "first" / "speed.json").read_text())["compilation"]
    second = json.loads((tmp_path / "second" / "speed.json").read_text())["compilation"]
    print(f"first run {first}\nsecond run {second}")
    # The final evaluation runs the program of the epochs' evaluations again, jitted anew: it is
    # loaded from the cache. speed.json is written after it, so that counts too.
    assert first["persistent_cache_hits"] >= 1 and first["persistent_cache_misses"] > 0
    # Every program the first run compiled went into the cache.
    assert len(list(cache.glob("*-cache"))) == first["persistent_cache_misses"]
    # The second run needed the same programs and loaded every one from the cache.
    assert second["persistent_cache_misses"] == 0
    assert second["persistent_cache_hits"] == (
        first["persistent_cache_hits"] + first["persistent_cache_misses"]
    )


@pytest.mark.slow  # commands in their own processes
def test_starting_training_does_not_import_torch():
    # tensorboardX imports torch whenever it is installed (as here, for the tests): 1.2 s of
    # every start for type hints. The training loop keeps it out; torch still imports after.
    code = (
        "import sys, caer_jax.train; from caer_jax import trainer; "
        "trainer.summary_writer_class(); assert 'torch' not in sys.modules, 'torch imported'; "
        "import torch; print(torch.__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "torch"
