"""The training loop as a library: `train_and_evaluate(config, workdir)`, which the command
(caer_jax.train), the ablation grid, tests and launch scripts call alike.

A run is set up (`_start`: model, data, mesh, compiled programs, and the newest intact checkpoint
resumed with its data iterator), trained (`_train`: each epoch ends with an evaluation on the
selection split and a checkpoint), and the best checkpoint by UAR is evaluated on the test split
(`_final_evaluation`). This module defines no flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from caer_jax import (
    checkpoint,
    compilation,
    distributed,
    evaluation,
    host_loop,
    label_sets,
    metrics,
    optim,
    sharding,
    steps,
)
from caer_jax import state as state_lib
from caer_jax.data import feature_cache, pipeline, prefetch, prepare
from caer_jax.models import caer


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported with torch kept out.

    tensorboardX imports torch when it is installed (the tests and the converter need it) only to
    name torch.Tensor in type hints; this loop logs floats. That import took 1.2 s of every start
    with torch's CPU wheel (over a third of importing this module), more with a CUDA build.
    tensorboardX takes the ImportError of a None entry in sys.modules as torch being absent.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class PreemptionWatch:
    """Tells every process, at the same step, that the job was asked to stop (SIGTERM).

    With several processes jax.distributed's preemption service agrees on the step (read
    through orbax); a single process watches the signal itself.
    """

    def __init__(self, checkpoints: checkpoint.Checkpoints):
        self.requested = False
        self._checkpoints = checkpoints
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            return self._checkpoints.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


def _log_param_groups(params: Any, config: ml_collections.ConfigDict, workdir: Path) -> None:
    lines = optim.describe_groups(
        params, config.optim, freeze_image_encoder=config.model.freeze_image_encoder
    )
    for line in lines:
        logging.info("param %s", line)
    if jax.process_index() == 0:
        (workdir / "param_groups.txt").write_text("\n".join(lines) + "\n")


def _meta(
    config: ml_collections.ConfigDict,
    epoch: int,
    history: list,
    nonfinite: int,
    data_start: int,
    prompt: dict,
) -> dict:
    return {
        "epoch": epoch,
        "selection_split": config.train.selection_split,
        "protocol": "authors (best epoch by test UAR)"
        if config.train.selection_split == "test"
        else "validation (best epoch by validation UAR)",
        "history": history,
        "skipped_nonfinite_steps": nonfinite,
        "code_version": checkpoint.code_version(),
        "data_iterator": checkpoint.iterator_layout(data_start, pipeline.worker_count(config)),
        "class_names": list(label_sets.load(config.model.label_set).class_names),
        "prompt": prompt,
    }


def _nonfinite_hint(config, record: host_loop.StepRecord) -> str:
    ids = pipeline.video_ids(config, config.data.train_split)
    return (
        f"clips of this process's batch: {[ids[i] for i in record.clips]}. The last checkpoint "
        "is untouched; set config.train.skip_nonfinite=True to skip such steps instead."
    )


def _write_speed(timer: host_loop.LoopTimer, workdir: Path) -> None:
    """speed.json: where this run's wall-clock time went (see host_loop.LoopTimer)."""
    summary = timer.summary()
    summary["compilation"] = compilation.stats()
    logging.info("speed: %s", json.dumps(summary))
    if jax.process_index() == 0:
        (workdir / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")


def jit_step(step_fn: Callable, *, state_shardings, mesh, replicated_args: int = 0):
    """`step_fn(state, batch, *args)` jitted for `mesh`: state laid out by `state_shardings`
    (and donated), batches split over the mesh, the `replicated_args` further arguments and the
    metrics replicated."""
    return jax.jit(
        sharding.traced_for(mesh, step_fn),
        in_shardings=(
            state_shardings,
            sharding.batch_sharding(mesh),
            *[sharding.replicated(mesh)] * replicated_args,
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_train_step(
    model,
    tx,
    *,
    streams: str,
    grad_accum_steps: int,
    state_shardings,
    mesh,
    method: str | None = None,
):
    """steps.train_step jitted (jit_step) as f(state, batch, dropout_rng). The key is an
    argument, not a constant of the program, so that runs with other seeds compile the same
    program (and load it from the persistent compilation cache). `method`: as
    steps.train_step."""
    step_fn = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        streams=streams,
        grad_accum_steps=grad_accum_steps,
        method=method,
    )
    return jit_step(step_fn, state_shardings=state_shardings, mesh=mesh, replicated_args=1)


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """What a run of `config` on `mesh` compiles and starts from; the benchmark builds the same
    one, so its programs are the training run's (and hit its persistent compilation cache)."""

    model: caer.CLIPCAER
    tx: Any
    abstract: state_lib.TrainState
    state_shardings: Any
    step_fn: Any  # f(state, batch, dropout_rng)
    eval_fn: Any
    init_rng: jax.Array
    dropout_rng: jax.Array

    @classmethod
    def create(cls, config, model, mesh, steps_per_epoch: int) -> TrainingSetup:
        init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
        abstract = state_lib.abstract_state(model, config, steps_per_epoch)
        state_shardings = sharding.tree_shardings(abstract, mesh)
        tx = optim.make_optimizer(
            abstract.params,
            config.optim,
            steps_per_epoch,
            freeze_image_encoder=config.model.freeze_image_encoder,
        )
        step_fn = jit_train_step(
            model,
            tx,
            streams=config.model.streams,
            grad_accum_steps=config.train.grad_accum_steps,
            state_shardings=state_shardings,
            mesh=mesh,
            method=feature_cache.apply_method(config),
        )
        eval_fn = evaluation.make_eval_step(model, config, mesh, abstract.params)
        return cls(model, tx, abstract, state_shardings, step_fn, eval_fn, init_rng, dropout_rng)

    def initial_state(self, config, params: Any = None) -> state_lib.TrainState:
        """A fresh state (from `params` if given) laid out on the mesh by one program (op by
        op, the optimizer's init compiled a small program per parameter shape)."""
        if params is None:
            params = caer.init_params(self.model, config.model, self.init_rng)
        create = lambda p: state_lib.create(p, self.tx)  # noqa: E731
        return jax.jit(create, out_shardings=self.state_shardings)(params)


def _evaluate_epoch(
    eval_fn, params, config, mesh, *, epoch, step, losses, history, writer, workdir
) -> dict:
    """End of an epoch: evaluates the selection split, appends to `history`, logs, plots."""
    split = config.train.selection_split
    result = evaluation.evaluate(eval_fn, params, config, split, mesh)
    train_loss = float(np.mean(losses)) if losses else float("nan")
    history.append(
        {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "split": split,
            "uar": result["uar"],
            "war": result["war"],
        }
    )
    logging.info(
        "epoch %d: train loss %.4f, %s UAR %.2f WAR %.2f",
        epoch,
        train_loss,
        split,
        result["uar"],
        result["war"],
    )
    if writer:
        writer.add_scalar(f"{split}/uar", result["uar"], step)
        writer.add_scalar(f"{split}/war", result["war"], step)
        writer.flush()
        metrics.plot_curves(history, workdir / "curves.png")
    return result


def resume_or_start(
    ckpts: checkpoint.Checkpoints,
    config: ml_collections.ConfigDict,
    mesh: Any,
    target: Any,
    *,
    host_iterator: Callable[..., Any],
    fresh_state: Callable[[], state_lib.TrainState],
    check_meta: Callable[[Path, dict], None] | None = None,
) -> checkpoint.RunStart:
    """The newest intact checkpoint restored onto `target` (Checkpoints.resume), or
    fresh_state(), each with its data iterator: this process's batches of
    host_iterator(seed=, process_index=, process_count=, start_step=) put on `mesh` ahead of
    use (DevicePrefetch)."""

    def new_iterator(start_step: int) -> prefetch.DevicePrefetch:
        host = host_iterator(
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_step=start_step,
        )
        return prefetch.DevicePrefetch(host, mesh, size=config.data.device_prefetch)

    resumed = ckpts.resume(
        target,
        config=config,
        new_iterator=new_iterator,
        worker_count=pipeline.worker_count(config),
        check_meta=check_meta,
    )
    if resumed is None:
        return checkpoint.RunStart(0, fresh_state(), None, new_iterator(0), 0)
    logging.info("resumed from step %d in %s", resumed.step, ckpts.directory)
    return resumed


@dataclasses.dataclass
class _Run:
    """What `_start` sets up and `_train` runs on; `history`, `nonfinite` and `epoch_losses`
    change as it trains."""

    config: ml_collections.ConfigDict
    workdir: Path
    setup: TrainingSetup
    mesh: Any
    ckpts: checkpoint.Checkpoints
    train_iter: prefetch.DevicePrefetch
    state: state_lib.TrainState
    data_start: int  # the step the data iterator started at
    history: list
    nonfinite: int
    prompt: dict
    steps_per_epoch: int
    timer: host_loop.LoopTimer
    epoch_losses: list = dataclasses.field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.train.num_epochs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains CLIP-CAER as `config` says; returns the test metrics of the best checkpoint, or
    None when the run was preempted (it then saved a checkpoint to resume from)."""
    run = _start(config, Path(workdir))
    preempted = _train(run)
    results = None if preempted else _final_evaluation(run)
    # After the final evaluation: the compilation figures count its programs too.
    _write_speed(run.timer, run.workdir)
    return results


def _start(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
    """Model, data, mesh and compiled programs of `config`; the state and data iterator of the
    workdir's newest intact checkpoint, or fresh ones."""
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoint.Checkpoints.of_run(workdir, config.train)
    # A resume takes the prompt token ids its checkpoint recorded: no tokenizer needed. (Before
    # the data, so that a tokenizer mistake is reported at once.)
    model, _ = caer.build_model(
        config.model,
        prompt_token_ids=ckpts.recorded_prompt_token_ids(),
        num_frames=config.data.num_segments,
    )
    prompt = checkpoint.prompt_record(config.model, model.prompt_token_ids)
    prepare.prepare_data(config)
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    steps_per_epoch = pipeline.steps_per_epoch(config)
    setup = TrainingSetup.create(config, model, mesh, steps_per_epoch)
    # Pixels, or the frozen image encoder's cached features (built here where missing).
    cache_params = feature_cache.prepare(config, model, setup.init_rng)
    # With the feature cache, prepare() already initialised these parameters (same key).
    start = resume_or_start(
        ckpts,
        config,
        mesh,
        checkpoint.with_shardings(setup.abstract, setup.state_shardings),
        host_iterator=functools.partial(feature_cache.train_iterator, config, cache_params),
        fresh_state=lambda: setup.initial_state(config, cache_params),
    )
    record = start.meta or {"history": [], "skipped_nonfinite_steps": 0}
    _log_param_groups(start.state.params, config, workdir)
    return _Run(
        config=config,
        workdir=workdir,
        setup=setup,
        mesh=mesh,
        ckpts=ckpts,
        train_iter=start.data_iterator,
        state=start.state,
        data_start=start.data_start,
        history=record["history"],
        nonfinite=record["skipped_nonfinite_steps"],
        prompt=prompt,
        steps_per_epoch=steps_per_epoch,
        timer=host_loop.LoopTimer(config.train.batch_size),
    )


def _train(run: _Run) -> bool:
    """Trains from the run's state to the last step; True when preempted (having saved the
    step it stopped at)."""
    config, total_steps = run.config, run.total_steps
    writer = None
    if jax.process_index() == 0:
        writer = summary_writer_class()(str(run.workdir / "tensorboard"))
    preemption = PreemptionWatch(run.ckpts)
    state = run.state
    start_step = last_step = int(jax.device_get(state.step))
    logging.info(
        "training %d epochs x %d steps (global batch %d) from step %d",
        config.train.num_epochs,
        run.steps_per_epoch,
        config.train.batch_size,
        start_step,
    )
    pending = host_loop.PendingMetrics(max_in_flight=config.data.device_prefetch)
    progress = host_loop.Progress(start_step, total_steps, config.train.batch_size, "clips")
    preempted = False
    try:
        with host_loop.closing(run.ckpts, run.train_iter, run.timer):
            if start_step < total_steps:
                batch = run.train_iter.peek()
                args = (state, batch, run.setup.dropout_rng)
                distributed.compile_together("train", run.setup.step_fn, *args)
            for last_step, state in host_loop.run_steps(
                run.state,
                functools.partial(_step_with_key, run.setup),
                run.train_iter,
                pending,
                start_step=start_step,
                total_steps=total_steps,
                timer=run.timer,
            ):
                log = last_step % config.train.log_every_steps == 0 or last_step == total_steps
                end_of_epoch = last_step % run.steps_per_epoch == 0
                preempted = preemption.reached(last_step)
                force_save = end_of_epoch or preempted
                save = force_save or run.ckpts.should_save(last_step)
                if not (log or save):
                    continue  # the host goes on to the next batch; the device is still busy
                # Metrics are read here and only here: every step's finite flag is checked
                # before anything is logged or saved, so no checkpoint follows an unread bad step.
                records = _read_finite(run, pending)
                if log:
                    _log_step(records[-1], run, progress, writer)
                _end_step(run, state, last_step, end_of_epoch, save, force_save, writer)
                if preempted:
                    logging.warning(
                        "preempted: saved step %d; the next start resumes from it", last_step
                    )
                    break
            run.timer.finished(last_step, state)
    finally:
        preemption.close()
        if writer:
            writer.close()
    return preempted


def _step_with_key(setup: TrainingSetup, state, batch):
    return setup.step_fn(state, batch, setup.dropout_rng)


def _read_finite(run: _Run, pending: host_loop.PendingMetrics) -> list[host_loop.StepRecord]:
    """The pending steps' records; their finite losses are added to the epoch's, a non-finite
    step stops the run or, with config.train.skip_nonfinite, is counted."""
    records = pending.read()
    losses, skipped = host_loop.finite_losses(
        records,
        skip_nonfinite=run.config.train.skip_nonfinite,
        hint=functools.partial(_nonfinite_hint, run.config),
    )
    run.epoch_losses += losses
    for record in skipped:
        run.nonfinite += 1
        logging.warning("skipped non-finite step %d (%d so far)", record.step, run.nonfinite)
    return records


def _log_step(record: host_loop.StepRecord, run: _Run, progress: host_loop.Progress, writer):
    epoch = (record.step - 1) // run.steps_per_epoch + 1
    values = record.metrics
    progress.log(
        record.step, "epoch %d loss %.4f acc %.3f", epoch, values["loss"], values["accuracy"]
    )
    if writer:
        for key in ("loss", "accuracy", "grad_norm"):
            writer.add_scalar(f"train/{key}", float(values[key]), record.step)


def _end_step(run: _Run, state, step: int, end_of_epoch: bool, save: bool, force: bool, writer):
    """An epoch's end evaluates the selection split; a save writes the state, the data
    iterator's position and the run's record (with the evaluation's UAR, which orbax keeps the
    best checkpoint by)."""
    config, epoch = run.config, (step - 1) // run.steps_per_epoch + 1
    eval_metrics = None
    if end_of_epoch:
        eval_start = time.time()
        eval_metrics = _evaluate_epoch(
            run.setup.eval_fn,
            state.params,
            config,
            run.mesh,
            epoch=epoch,
            step=step,
            losses=run.epoch_losses,
            history=run.history,
            writer=writer,
            workdir=run.workdir,
        )
        run.timer.evaluated(time.time() - eval_start, len(eval_metrics["predictions"]["index"]))
        run.epoch_losses = []
    if save:
        meta = _meta(config, epoch, run.history, run.nonfinite, run.data_start, run.prompt)
        with run.timer.checkpointing():
            run.ckpts.save(
                state,
                config=config,
                meta=meta,
                metrics=None if eval_metrics is None else {"uar": eval_metrics["uar"]},
                data_iterator=run.train_iter,
                force=force,
            )


def _final_evaluation(run: _Run) -> dict:
    """The test metrics of the best checkpoint by the selection split's UAR."""
    return evaluation.evaluate_checkpoint(
        run.config, run.workdir, step="best", split=run.config.data.eval_split
    )
