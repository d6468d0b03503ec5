"""Training: `python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/tiny`.

The loop lives in `train_and_evaluate(config, workdir)` so that tests and launch scripts call the
same code as the command line. Each epoch ends with an evaluation on the selection split and a
checkpoint; the best checkpoint by UAR is evaluated on the test split at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from caer_jax import (
    checkpoint,
    cli,
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


def _summary_writer_class():
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


SummaryWriter = _summary_writer_class()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")


class PreemptionWatch:
    """Tells every process, at the same step, that the job was asked to stop (SIGTERM).

    With several processes jax.distributed's preemption service agrees on the step; a single
    process watches the signal itself.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        if not self._multi:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
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


def _iterator_layout(config: ml_collections.ConfigDict, start_step: int) -> dict:
    # What a saved iterator state is relative to: the step its iterator started at, the process
    # count that split the batches and the worker processes (grain's state has one per worker).
    return {
        "start_step": start_step,
        "process_count": jax.process_count(),
        "worker_count": pipeline.worker_count(config),
    }


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
        "data_iterator": _iterator_layout(config, data_start),
        "class_names": list(label_sets.load(config.model.label_set).class_names),
        "prompt": prompt,
    }


def _nonfinite_error(config, record: host_loop.StepRecord) -> FloatingPointError:
    ids = pipeline.video_ids(config, config.data.train_split)
    clips = [ids[i] for i in record.clips]
    return FloatingPointError(
        f"non-finite loss ({record.metrics['loss']}) or gradient norm "
        f"({record.metrics['grad_norm']}) at step {record.step}; clips of this process's batch: "
        f"{clips}. The last checkpoint is untouched; set config.train.skip_nonfinite=True to "
        f"skip such steps instead."
    )


def _log_step(
    record: host_loop.StepRecord, config, total_steps, epoch, start_step, t_start, writer
) -> None:
    step, values = record.step, record.metrics
    rate = (step - start_step) / (time.time() - t_start)
    logging.info(
        "step %d/%d epoch %d loss %.4f acc %.3f | %.2f steps/s %.1f clips/s ETA %.0fs",
        step,
        total_steps,
        epoch,
        values["loss"],
        values["accuracy"],
        rate,
        rate * config.train.batch_size,
        (total_steps - step) / rate,
    )
    if writer:
        for key in ("loss", "accuracy", "grad_norm"):
            writer.add_scalar(f"train/{key}", float(values[key]), step)


def _write_speed(timer: host_loop.LoopTimer, workdir: Path) -> None:
    """speed.json: where this run's wall-clock time went (see host_loop.LoopTimer)."""
    summary = timer.summary()
    summary["compilation"] = compilation.stats()
    logging.info("speed: %s", json.dumps(summary))
    if jax.process_index() == 0:
        (workdir / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")


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
    """steps.train_step jitted for `mesh` as f(state, batch, dropout_rng): state laid out by
    `state_shardings` (and donated), batches split over the mesh, the key and the metrics
    replicated. The key is an argument, not a constant of the program, so that runs with other
    seeds compile the same program (and load it from the persistent compilation cache).
    `method`: as steps.train_step."""
    return jax.jit(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            streams=streams,
            grad_accum_steps=grad_accum_steps,
            method=method,
        ),
        in_shardings=(
            state_shardings,
            sharding.batch_sharding(mesh),
            sharding.replicated(mesh),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Trains CLIP-CAER as `config` says; returns the test metrics of the best checkpoint, or
    None when the run was preempted (it then saved a checkpoint to resume from)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
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
    total_steps = steps_per_epoch * config.train.num_epochs

    setup = TrainingSetup.create(config, model, mesh, steps_per_epoch)
    abstract, state_shardings = setup.abstract, setup.state_shardings

    # Pixels, or the frozen image encoder's cached features (built here where missing).
    cache_params = feature_cache.prepare(config, model, setup.init_rng)

    def new_iterator(start_step: int) -> prefetch.DevicePrefetch:
        host_iterator = feature_cache.train_iterator(
            config,
            cache_params,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_step=start_step,
        )
        return prefetch.DevicePrefetch(host_iterator, mesh, size=config.data.device_prefetch)

    target = checkpoint.with_shardings(abstract, state_shardings)

    def restore(step: int):
        # The saved position fits an iterator made as the saving run made its own. With another
        # process or worker count it does not; the global batches are a function of the step
        # alone, so a new iterator starts at the step instead.
        saved = ckpts.read_meta(step).get("data_iterator")
        fits = bool(saved) and saved == _iterator_layout(config, saved["start_step"])
        if not fits:
            logging.info("data iterator saved as %s; starting it at step %d", saved, step)
        data_start = saved["start_step"] if fits else step
        train_iter = new_iterator(data_start)
        try:
            state, meta = ckpts.restore(
                step, target, config=config, data_iterator=train_iter if fits else None
            )
        except BaseException:
            train_iter.close()  # its worker processes, before the previous checkpoint is tried
            raise
        return state, meta, train_iter, data_start

    resumed = ckpts.restore_newest_intact(restore)
    if resumed is None:
        # With the feature cache, prepare() already initialised these parameters (same key).
        state = setup.initial_state(config, cache_params)
        history, nonfinite = [], 0
        data_start = 0
        train_iter = new_iterator(data_start)
    else:
        resume_step, (state, meta, train_iter, data_start) = resumed
        history, nonfinite = meta["history"], meta["skipped_nonfinite_steps"]
        logging.info("resumed from step %d in %s", resume_step, ckpts.directory)
    _log_param_groups(state.params, config, workdir)

    step_fn, eval_fn = setup.step_fn, setup.eval_fn
    writer = SummaryWriter(str(workdir / "tensorboard")) if jax.process_index() == 0 else None
    preemption = PreemptionWatch()

    start_step = int(jax.device_get(state.step))
    logging.info(
        "training %d epochs x %d steps (global batch %d) from step %d",
        config.train.num_epochs,
        steps_per_epoch,
        config.train.batch_size,
        start_step,
    )
    timer = host_loop.LoopTimer(config.train.batch_size)
    pending = host_loop.PendingMetrics(max_in_flight=config.data.device_prefetch)
    t_start = time.time()
    epoch_losses: list[float] = []
    preempted = False
    last_step = start_step
    try:
        if start_step < total_steps:
            batch = train_iter.peek()
            distributed.compile_together("train", step_fn, state, batch, setup.dropout_rng)
        for step in range(start_step + 1, total_steps + 1):
            batch, host = next(train_iter)
            state, step_metrics = step_fn(state, batch, setup.dropout_rng)
            pending.add(step, step_metrics, host["index"])
            last_step = step
            if step == start_step + 1:
                timer.first_step_finished(step, step_metrics)
            epoch = (step - 1) // steps_per_epoch + 1
            end_of_epoch = step % steps_per_epoch == 0
            log = step % config.train.log_every_steps == 0 or step == total_steps
            preempted = preemption.reached(step)
            every = config.train.checkpoint_every_steps
            save = end_of_epoch or preempted or bool(every and step % every == 0)
            if not (log or end_of_epoch or save):
                continue  # the host goes on to the next batch; the device is still busy
            # Metrics are read here and only here: every step's finite flag is checked before
            # anything is logged or saved, so no checkpoint follows an unread bad step.
            records = pending.read()
            for record in records:
                if record.metrics["finite"]:
                    epoch_losses.append(float(record.metrics["loss"]))
                elif config.train.skip_nonfinite:
                    nonfinite += 1
                    logging.warning(
                        "skipped non-finite step %d (%d so far)", record.step, nonfinite
                    )
                else:
                    raise _nonfinite_error(config, record)
            if log:
                _log_step(records[-1], config, total_steps, epoch, start_step, t_start, writer)

            eval_metrics = None
            if end_of_epoch:
                eval_start = time.time()
                eval_metrics = _evaluate_epoch(
                    eval_fn,
                    state.params,
                    config,
                    mesh,
                    epoch=epoch,
                    step=step,
                    losses=epoch_losses,
                    history=history,
                    writer=writer,
                    workdir=workdir,
                )
                timer.evaluated(time.time() - eval_start, len(eval_metrics["predictions"]["index"]))
                epoch_losses = []
            if save:
                with timer.checkpointing():
                    ckpts.save(
                        state,
                        config=config,
                        meta=_meta(config, epoch, history, nonfinite, data_start, prompt),
                        metrics=None if eval_metrics is None else {"uar": eval_metrics["uar"]},
                        data_iterator=train_iter,
                    )
            if preempted:
                logging.warning("preempted: saved step %d; the next start resumes from it", step)
                break
        timer.finished(last_step, state)
    finally:
        # Also on errors: writes in flight complete, so the last good checkpoint is on disk.
        final_wait = time.time()
        ckpts.wait()
        timer.final_wait_seconds = time.time() - final_wait
        ckpts.close()
        preemption.close()
        train_iter.close()
        if writer:
            writer.close()
    results = None
    if not preempted:
        results = evaluation.evaluate_checkpoint(
            config, workdir, step="best", split=config.data.eval_split
        )
    # After the final evaluation: the compilation figures count its programs too.
    _write_speed(timer, workdir)
    return results


def run(argv=()) -> None:
    cli.start(argv, config=_CONFIG.value, workdir=_WORKDIR.value)
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if results is None:
        print(f"preempted; run the same command again to resume from {_WORKDIR.value}")
        return
    print(f"test UAR {results['uar']:.2f} WAR {results['war']:.2f} (workdir {_WORKDIR.value})")


def main() -> None:
    cli.main(run)


if __name__ == "__main__":
    main()
