"""CLIP pretraining: `python -m caer_jax.pretrain --config=configs/pretrain_tiny.py --workdir=W`.

Trains both towers of the project's Flax CLIP with CLIP's contrastive loss (models/contrastive.py,
steps.pretrain_step) on the synthetic generator's frames and their captions
(caer_jax.data.pretrain_data): each frame gives its face crop and its context frame, each with its
own caption, so a batch of B frames is a 2B x 2B similarity matrix. The machinery is the training
loop's (trainer.jit_step, trainer.resume_or_start: exact resume; host_loop's parts).

At the end the weights are exported to W/clip as a Hugging Face CLIP folder (export.py), with
the fingerprint of the config and data; a later run whose fingerprint is the same returns that
folder at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging

from caer_jax import checkpoint, cli, errors, host_loop, metrics, sharding, steps, trainer
from caer_jax import state as state_lib
from caer_jax.data import captions, pipeline, pretrain_data
from caer_jax.models import clip, contrastive, export
from caer_jax.models import tokenizer as tokenizer_lib

EXPORT_DIR = "clip"  # the exported Hugging Face folder, inside the workdir
TOKENIZER_DIR = "tokenizer"


def run_fingerprint(config: ml_collections.ConfigDict, data_fingerprint: str) -> str:
    """What the exported weights depend on: the whole config but where things are written and
    how many processes do it, and the data."""
    cfg = config.to_dict()
    for field in ("dir", "draw_workers", "worker_count", "prefetch_buffer_size", "device_prefetch"):
        cfg["data"].pop(field)
    cfg["train"].pop("log_every_steps")
    blob = json.dumps({"config": cfg, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Run:
    """What `_start` sets up and `_train` runs on."""

    config: ml_collections.ConfigDict
    workdir: Path
    fingerprint: str
    ckpts: checkpoint.Checkpoints
    step_fn: Any  # f(state, batch)
    start: checkpoint.RunStart
    history: list


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Pretrains as `config` says (resuming from the workdir's newest checkpoint) and exports;
    returns {"export": folder, "reused": bool, "fingerprint": ...}."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = workdir / TOKENIZER_DIR
    size = tokenizer_lib.write_offline_vocab(tokenizer_dir, captions.vocabulary_texts())
    if size > config.model.clip.vocab_size:
        raise errors.BadInputError(
            f"the offline tokenizer has {size} tokens but config.model.clip.vocab_size is "
            f"{config.model.clip.vocab_size}; raise it to at least {size}"
        )
    pretrain_data.check_config(config.data)
    model = contrastive.build_model(config.model)
    fingerprint = run_fingerprint(config, pretrain_data.fingerprint(config.data, tokenizer_dir))
    out = workdir / EXPORT_DIR
    if export.read_fingerprint(out) == fingerprint:
        logging.info("%s was pretrained with this config and data (%s): reused", out, fingerprint)
        return {"export": out, "reused": True, "fingerprint": fingerprint}

    checkpoint.set_aside_other_run(workdir, fingerprint)
    run = _start(config, workdir, model, fingerprint, tokenizer_dir)
    start_step, started = int(jax.device_get(run.start.state.step)), time.time()
    params = jax.device_get(_train(run).params)
    if jax.process_index() == 0:
        export.write_folder(
            out,
            {"visual": params["visual"], "text": params["text"]},
            clip.CLIPGeometry.from_config(config.model.clip),
            tokenizer_dir=tokenizer_dir,
            pixel_normalization=config.model.pixel_normalization,
            logit_scale=float(min(np.exp(params["log_logit_scale"]), config.model.max_logit_scale)),
            fingerprint=fingerprint,
        )
    done = config.train.num_steps - start_step
    logging.info("pretrained %d steps in %.0f s; exported %s", done, time.time() - started, out)
    return {"export": out, "reused": False, "fingerprint": fingerprint}


def _start(config, workdir: Path, model, fingerprint: str, tokenizer_dir: Path) -> _Run:
    """The pairs, mesh and jitted step of `config`; the state and data iterator of the
    workdir's newest intact checkpoint of this fingerprint, or fresh ones."""
    source = pretrain_data.training_pairs(config, tokenizer_dir)
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    tx = contrastive.make_optimizer(config.optim, config.train.num_steps)
    s = config.data.image_size
    images, ids = jnp.zeros((1, s, s, 3)), jnp.zeros((1, config.data.text_length), jnp.int32)

    def fresh_state() -> state_lib.TrainState:
        params = model.init(jax.random.key(config.seed), images, ids)["params"]
        return state_lib.create(params, tx)

    abstract = jax.eval_shape(fresh_state)
    state_shardings = sharding.tree_shardings(abstract, mesh)
    step_fn = trainer.jit_step(
        functools.partial(
            steps.pretrain_step,
            model=model,
            tx=tx,
            pixel_normalization=config.model.pixel_normalization,
            max_logit_scale=config.model.max_logit_scale,
        ),
        state_shardings=state_shardings,
        mesh=mesh,
    )
    ckpts = checkpoint.Checkpoints.of_run(workdir, config.train)
    start = trainer.resume_or_start(
        ckpts,
        config,
        mesh,
        checkpoint.with_shardings(abstract, state_shardings),
        host_iterator=functools.partial(
            pipeline.train_iterator, config, source=source, loader=pretrain_data.PairLoader()
        ),
        fresh_state=jax.jit(fresh_state, out_shardings=state_shardings),
        check_meta=functools.partial(checkpoint.refuse_other_run, fingerprint),
    )
    history = [] if start.meta is None else start.meta["history"]
    logging.info(
        "pretraining %d steps of %d frames (%d pairs) on %d pairs",
        config.train.num_steps,
        config.train.batch_size,
        2 * config.train.batch_size,
        2 * len(source),
    )
    return _Run(config, workdir, fingerprint, ckpts, step_fn, start, history)


def _train(run: _Run) -> state_lib.TrainState:
    """Trains from the run's state to config.train.num_steps; returns the last state."""
    config, state = run.config, run.start.state
    total_steps, start_step = config.train.num_steps, int(jax.device_get(state.step))
    pending = host_loop.PendingMetrics(max_in_flight=config.data.device_prefetch)
    progress = host_loop.Progress(start_step, total_steps, 2 * config.train.batch_size, "pairs")
    losses: list[float] = []
    with host_loop.closing(run.ckpts, run.start.data_iterator):
        for step, state in host_loop.run_steps(
            run.start.state,
            run.step_fn,
            run.start.data_iterator,
            pending,
            start_step=start_step,
            total_steps=total_steps,
        ):
            last = step == total_steps
            log = last or step % config.train.log_every_steps == 0
            save = last or run.ckpts.should_save(step)
            if not (log or save):
                continue
            records = pending.read()
            losses += host_loop.finite_losses(records, skip_nonfinite=False, hint=_lower_lr)[0]
            shown = {k: float(records[-1].metrics[k]) for k in ("loss", "accuracy", "logit_scale")}
            progress.log(step, "loss %.4f acc %.3f scale %.1f", *shown.values())
            del shown["loss"]  # the history keeps the mean since its last entry instead
            run.history.append({"step": step, "train_loss": float(np.mean(losses)), **shown})
            losses = []
            if jax.process_index() == 0:
                metrics.plot_pretrain_curves(run.history, run.workdir / "curves.png")
            if save:
                run.ckpts.save(
                    state,
                    config=config,
                    meta=_meta(run),
                    data_iterator=run.start.data_iterator,
                    force=last,
                )
    return state


def _meta(run: _Run) -> dict:
    return {
        "fingerprint": run.fingerprint,
        "history": run.history,
        "data_iterator": checkpoint.iterator_layout(
            run.start.data_start, pipeline.worker_count(run.config)
        ),
        "code_version": checkpoint.code_version(),
    }


def _lower_lr(record: host_loop.StepRecord) -> str:
    return "the last checkpoint is untouched: lower config.optim.lr"


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "workdir": flags.DEFINE_string(
            "workdir", None, "Directory for checkpoints, logs and the export."
        ),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    config, workdir = flag.config.value, flag.workdir.value
    cli.start(argv, config=config, workdir=workdir)
    result = pretrain(config, workdir)
    if result["reused"]:
        print(f"{result['export']} is up to date (pretrained with this config and data): reused")
    else:
        print(f"pretrained CLIP exported to {result['export']}")


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
