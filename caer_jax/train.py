"""Training: `python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/tiny`.

The loop lives in `train_and_evaluate(config, workdir)` so that tests and launch scripts call the
same code as the command line. Each epoch ends with an evaluation on the selection split and a
checkpoint; the best checkpoint by UAR is evaluated on the test split at the end.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tensorboardX import SummaryWriter

from caer_jax import checkpoint, distributed, evaluation, metrics, optim, sharding
from caer_jax import state as state_lib
from caer_jax.data import pipeline, prepare
from caer_jax.models import caer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")


def stream_inputs(batch: dict, streams: str) -> tuple[Any, Any]:
    """The (face, context) clips a model of `streams` consumes; the other one is None."""
    face = batch["face"] if streams in ("face", "both") else None
    context = batch["context"] if streams in ("context", "both") else None
    return face, context


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(
    state: state_lib.TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    dropout_rng: jax.Array,
    streams: str,
) -> tuple[state_lib.TrainState, dict]:
    """One SGD step on a global batch; returns the new state and the batch's loss and accuracy."""
    rng = jax.random.fold_in(dropout_rng, state.step)
    face, context = stream_inputs(batch, streams)

    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params}, face, context, train=True, rngs={"dropout": rng}
        )
        return cross_entropy(logits, batch["label"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    grad_norm = optax.global_norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm}


def _log_param_groups(params: Any, optim_config: ml_collections.ConfigDict, workdir: Path) -> None:
    lines = optim.describe_groups(params, optim_config)
    for line in lines:
        logging.info("param %s", line)
    if jax.process_index() == 0:
        (workdir / "param_groups.txt").write_text("\n".join(lines) + "\n")


def _meta(config: ml_collections.ConfigDict, epoch: int, eval_metrics: dict | None) -> dict:
    return {
        "epoch": epoch,
        "selection_split": config.train.selection_split,
        "protocol": "authors (best epoch by test UAR)"
        if config.train.selection_split == "test"
        else "validation (best epoch by validation UAR)",
        "metrics": eval_metrics,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains CLIP-CAER as `config` says; returns the test metrics of the best checkpoint."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare.prepare_data(config)

    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    steps_per_epoch = pipeline.steps_per_epoch(config)
    total_steps = steps_per_epoch * config.train.num_epochs

    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    abstract = state_lib.abstract_state(model, config, steps_per_epoch)
    state_shardings = sharding.tree_shardings(abstract, mesh)
    tx = optim.make_optimizer(abstract.params, config.optim, steps_per_epoch)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)

    if ckpts.manager.latest_step() is not None:
        step = ckpts.manager.latest_step()
        state, _, meta = ckpts.restore(step, checkpoint.with_shardings(abstract, state_shardings))
        history = meta.get("history", [])
        logging.info("resumed from step %d (epoch %d) in %s", step, meta["epoch"], ckpts.directory)
    else:
        params = caer.init_params(model, config.model, init_rng)
        state = jax.device_put(state_lib.create(params, tx), state_shardings)
        history = []
    _log_param_groups(state.params, config.optim, workdir)

    step_fn = jax.jit(
        functools.partial(
            train_step, model=model, tx=tx, dropout_rng=dropout_rng, streams=config.model.streams
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = evaluation.make_eval_step(model, config, mesh, abstract.params)
    writer = SummaryWriter(str(workdir / "tensorboard")) if jax.process_index() == 0 else None

    start_step = int(jax.device_get(state.step))
    if start_step % steps_per_epoch:
        raise ValueError(f"checkpoint step {start_step} is not at an epoch boundary")
    first_epoch = start_step // steps_per_epoch
    train_iter = pipeline.train_iterator(
        config,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_epoch=first_epoch,
    )
    logging.info(
        "training %d epochs x %d steps (global batch %d) from step %d",
        config.train.num_epochs,
        steps_per_epoch,
        config.train.batch_size,
        start_step,
    )
    t_start = time.time()
    step = start_step
    for epoch in range(first_epoch, config.train.num_epochs):
        epoch_losses = []
        for _ in range(steps_per_epoch):
            batch = pipeline.global_batch(next(train_iter), mesh)
            state, step_metrics = step_fn(state, batch)
            step += 1
            if step % config.train.log_every_steps == 0 or step == total_steps:
                step_metrics = jax.device_get(step_metrics)
                if not np.isfinite(step_metrics["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss {step_metrics['loss']} at step {step}"
                    )
                elapsed = time.time() - t_start
                rate = (step - start_step) / elapsed
                logging.info(
                    "step %d/%d epoch %d loss %.4f acc %.3f | %.2f steps/s %.1f clips/s ETA %.0fs",
                    step,
                    total_steps,
                    epoch + 1,
                    step_metrics["loss"],
                    step_metrics["accuracy"],
                    rate,
                    rate * config.train.batch_size,
                    (total_steps - step) / rate,
                )
                if writer:
                    for key, value in step_metrics.items():
                        writer.add_scalar(f"train/{key}", float(value), step)
            epoch_losses.append(step_metrics["loss"])

        eval_metrics = evaluation.evaluate(
            eval_fn, state.params, config, config.train.selection_split, mesh
        )
        train_loss = float(np.mean(jax.device_get(epoch_losses)))
        history.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": train_loss,
                "split": config.train.selection_split,
                "uar": eval_metrics["uar"],
                "war": eval_metrics["war"],
            }
        )
        logging.info(
            "epoch %d: train loss %.4f, %s UAR %.2f WAR %.2f",
            epoch + 1,
            train_loss,
            config.train.selection_split,
            eval_metrics["uar"],
            eval_metrics["war"],
        )
        if writer:
            writer.add_scalar(f"{config.train.selection_split}/uar", eval_metrics["uar"], step)
            writer.add_scalar(f"{config.train.selection_split}/war", eval_metrics["war"], step)
            writer.flush()
            metrics.plot_curves(history, workdir / "curves.png")
        meta = _meta(config, epoch + 1, {"uar": eval_metrics["uar"], "war": eval_metrics["war"]})
        meta["history"] = history
        ckpts.save(state, config=config, meta=meta, metrics={"uar": eval_metrics["uar"]})

    ckpts.wait()
    best_step = ckpts.resolve_step("best")
    logging.info("best checkpoint: step %d", best_step)
    ckpts.close()
    if writer:
        writer.close()
    return evaluation.evaluate_checkpoint(
        config, workdir, step="best", split=config.data.eval_split
    )


def run(argv=()) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required")
    distributed.initialize()
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(f"test UAR {results['uar']:.2f} WAR {results['war']:.2f} (workdir {_WORKDIR.value})")


def main() -> None:
    app.run(run)


if __name__ == "__main__":
    main()
