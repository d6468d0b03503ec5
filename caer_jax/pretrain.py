"""CLIP pretraining: `python -m caer_jax.pretrain --config=configs/pretrain_tiny.py --workdir=W`.

Trains both towers of the project's Flax CLIP (models/clip.py) with CLIP's contrastive loss: the
symmetric cross-entropy over the image-text cosine similarities of a batch, scaled by a learned
temperature (exp(t), t initialised to log(1 / config.model.init_temperature), exp(t) clipped at
config.model.max_logit_scale). The pairs are the synthetic generator's frames and their captions
(caer_jax.data.pretrain_data): each frame gives its face crop and its context frame, each with
its own caption, so a batch of B frames is a 2B x 2B similarity matrix.

The machinery is the training loop's: the (data, fsdp) mesh, a jitted step with shardings,
orbax checkpoints with the grain iterator's position (exact resume), the persistent compilation
cache, log lines with rate and ETA, curves.png.

At the end the weights are exported to W/clip as a Hugging Face CLIP folder (export.py), with
the fingerprint of the config and data; a later run whose fingerprint is the same returns that
folder at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from caer_jax import checkpoint, cli, errors, host_loop, metrics, sharding
from caer_jax import state as state_lib
from caer_jax.data import pipeline, prefetch, pretrain_data
from caer_jax.models import caer, clip, export
from caer_jax.models import tokenizer as tokenizer_lib

# The flags are defined when the command starts, not at import (as caer_jax.data.check's): the
# training module, which tests import beside this one, defines --config and --workdir at import.
_FLAGS: dict[str, Any] = {}

EXPORT_DIR = "clip"  # the exported Hugging Face folder, inside the workdir
TOKENIZER_DIR = "tokenizer"


class ContrastiveCLIP(nn.Module):
    """The two towers of clip.CLIP (same parameter names: "visual", "text") and the learned
    log logit scale."""

    geometry: clip.CLIPGeometry
    init_temperature: float
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.visual = clip.VisionTransformer(self.geometry, self.dtype, self.remat)
        self.text = clip.TextTransformer(self.geometry, self.dtype, self.remat)
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.initializers.constant(-math.log(self.init_temperature)), ()
        )

    def __call__(self, images: jax.Array, token_ids: jax.Array):
        return self.visual(images), self.text(token_ids), self.log_logit_scale


def contrastive_loss(
    image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """CLIP's loss: mean of the image->text and text->image cross-entropies, pair i the target
    of row i; and the image->text top-1 accuracy."""
    i = _l2_normalize(image_features.astype(jnp.float32))
    t = _l2_normalize(text_features.astype(jnp.float32))
    logits = logit_scale * i @ t.T
    targets = jnp.arange(logits.shape[0])
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    per_text = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
    return (per_image.mean() + per_text.mean()) / 2, accuracy


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def model_pixels(pixels: jax.Array, pixel_normalization: str) -> jax.Array:
    """uint8 frames -> the encoder's input, as CLIP-CAER's encode_frames makes it."""
    x = caer.pixels_to_unit_range(pixels)
    if pixel_normalization == "clip":
        x = (x - jnp.asarray(caer.CLIP_PIXEL_MEAN)) / jnp.asarray(caer.CLIP_PIXEL_STD)
    return x


def pretrain_step(
    state: state_lib.TrainState,
    batch: dict,
    *,
    model: ContrastiveCLIP,
    tx: optax.GradientTransformation,
    pixel_normalization: str,
    max_logit_scale: float,
) -> tuple[state_lib.TrainState, dict]:
    """One optimizer step on a global batch of frames: face and context images against their
    captions in one 2B x 2B similarity matrix. A non-finite loss or gradient leaves the state as
    it was (the step counter advances), as steps.train_step."""
    images = model_pixels(jnp.concatenate([batch["face"], batch["context"]]), pixel_normalization)
    ids = jnp.concatenate([batch["face_ids"], batch["context_ids"]])

    def loss_fn(params):
        image_features, text_features, log_scale = model.apply({"params": params}, images, ids)
        scale = jnp.minimum(jnp.exp(log_scale), max_logit_scale)
        loss, accuracy = contrastive_loss(image_features, text_features, scale)
        return loss, (accuracy, scale)

    (loss, (accuracy, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep_if_bad, params, state.params),
        opt_state=jax.tree.map(keep_if_bad, opt_state, state.opt_state),
    )
    return new_state, {
        "loss": loss,
        "accuracy": accuracy,
        "logit_scale": scale,
        "grad_norm": grad_norm,
        "finite": finite,
    }


def make_optimizer(optim_cfg: ml_collections.ConfigDict, num_steps: int):
    """AdamW with a linear warm-up and a cosine decay to zero; weight decay on matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim_cfg.lr, optim_cfg.warmup_steps, max(num_steps, optim_cfg.warmup_steps + 1)
    )
    return optax.adamw(
        schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )


def build_model(config: ml_collections.ConfigDict) -> ContrastiveCLIP:
    if config.model.pixel_normalization not in caer.PIXEL_NORMALIZATIONS:
        raise errors.BadInputError(
            f"config.model.pixel_normalization={config.model.pixel_normalization!r}; expected "
            f"one of {', '.join(caer.PIXEL_NORMALIZATIONS)}"
        )
    if not 0 < config.model.init_temperature <= 1:
        raise errors.BadInputError(
            f"config.model.init_temperature={config.model.init_temperature}; expected in (0, 1]"
        )
    return ContrastiveCLIP(
        clip.CLIPGeometry.from_config(config.model.clip),
        config.model.init_temperature,
        clip.dtype_from_name(config.model.dtype),
        config.model.remat,
    )


def run_fingerprint(config: ml_collections.ConfigDict, data_fingerprint: str) -> str:
    """What the exported weights depend on: the whole config but where things are written and
    how many processes do it, and the data."""
    cfg = config.to_dict()
    for field in ("dir", "draw_workers", "worker_count", "prefetch_buffer_size", "device_prefetch"):
        cfg["data"].pop(field)
    cfg["train"].pop("log_every_steps")
    blob = json.dumps({"config": cfg, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


RUN_FILE = "fingerprint.txt"  # the fingerprint of the run whose checkpoints the workdir holds


def _set_aside_other_run(workdir: Path, fingerprint: str) -> None:
    """Checkpoints of another config or data are renamed checkpoints.<their fingerprint> (kept,
    not resumed from), so that a changed config or generator pretrains afresh."""
    run_file = workdir / RUN_FILE
    previous = run_file.read_text().strip() if run_file.exists() else fingerprint
    checkpoints = workdir / "checkpoints"
    if previous != fingerprint and checkpoints.exists():
        aside = workdir / f"checkpoints.{previous}"
        logging.warning(
            "%s holds checkpoints of another config or data (%s, now %s): moved to %s; "
            "pretraining afresh",
            checkpoints,
            previous,
            fingerprint,
            aside,
        )
        if aside.exists():
            shutil.rmtree(aside)
        checkpoints.rename(aside)
    if jax.process_index() == 0:
        run_file.write_text(fingerprint + "\n")


def _iterator_layout(config: ml_collections.ConfigDict, start_step: int) -> dict:
    return {
        "start_step": start_step,
        "process_count": jax.process_count(),
        "worker_count": pipeline.worker_count(config),
    }


def _log_step(record, total_steps: int, start_step: int, t_start: float, batch_size: int) -> None:
    step, values = record.step, record.metrics
    rate = (step - start_step) / max(time.time() - t_start, 1e-9)
    logging.info(
        "step %d/%d loss %.4f acc %.3f scale %.1f | %.2f steps/s %.0f pairs/s ETA %.0fs",
        step,
        total_steps,
        values["loss"],
        values["accuracy"],
        values["logit_scale"],
        rate,
        rate * 2 * batch_size,
        (total_steps - step) / rate if rate > 0 else float("nan"),
    )


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Pretrains as `config` says (resuming from the workdir's newest checkpoint) and exports;
    returns {"export": folder, "reused": bool, "fingerprint": ...}."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = workdir / TOKENIZER_DIR
    size = tokenizer_lib.write_offline_vocab(tokenizer_dir)
    if size > config.model.clip.vocab_size:
        raise errors.BadInputError(
            f"the offline tokenizer has {size} tokens but config.model.clip.vocab_size is "
            f"{config.model.clip.vocab_size}; raise it to at least {size}"
        )
    pretrain_data.check_config(config.data)
    model = build_model(config)
    fingerprint = run_fingerprint(config, pretrain_data.fingerprint(config.data, tokenizer_dir))
    out = workdir / EXPORT_DIR
    if export.read_fingerprint(out) == fingerprint:
        logging.info("%s was pretrained with this config and data (%s): reused", out, fingerprint)
        return {"export": out, "reused": True, "fingerprint": fingerprint}

    _set_aside_other_run(workdir, fingerprint)
    data_dir = pretrain_data.build(config.data, tokenizer_dir)
    source = pretrain_data.PairSource(data_dir, config.data)
    if len(source) < config.train.batch_size:
        raise errors.BadInputError(
            f"{data_dir} holds {len(source)} pairs, fewer than one batch "
            f"(config.train.batch_size={config.train.batch_size}); draw more clips "
            "(config.data.num_clips) or lower the batch size"
        )
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())
    total_steps = config.train.num_steps
    tx = make_optimizer(config.optim, total_steps)
    b, length, s = 1, config.data.text_length, config.data.image_size
    init_rng = jax.random.key(config.seed)

    def init_params():
        images = jnp.zeros((b, s, s, 3), jnp.float32)
        return model.init(init_rng, images, jnp.zeros((b, length), jnp.int32))["params"]

    abstract = jax.eval_shape(lambda: state_lib.create(init_params(), tx))
    state_shardings = sharding.tree_shardings(abstract, mesh)
    step_fn = jax.jit(
        functools.partial(
            pretrain_step,
            model=model,
            tx=tx,
            pixel_normalization=config.model.pixel_normalization,
            max_logit_scale=config.model.max_logit_scale,
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)

    def new_iterator(start_step: int) -> prefetch.DevicePrefetch:
        host = pipeline.train_iterator(
            config,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_step=start_step,
            source=source,
            loader=pretrain_data.PairLoader(),
        )
        return prefetch.DevicePrefetch(host, mesh, size=config.data.device_prefetch)

    target = checkpoint.with_shardings(abstract, state_shardings)

    def restore(step: int):
        meta = ckpts.read_meta(step)
        if meta.get("fingerprint") != fingerprint:
            raise checkpoint.IncompatibleCheckpointError(
                f"checkpoint {ckpts.directory / str(step)} was pretrained with another config or "
                f"data (fingerprint {meta.get('fingerprint')}, now {fingerprint}); use another "
                "--workdir, or remove this one to start afresh"
            )
        saved = meta["data_iterator"]
        fits = saved == _iterator_layout(config, saved["start_step"])
        data_start = saved["start_step"] if fits else step
        iterator = new_iterator(data_start)
        try:
            state, meta = ckpts.restore(
                step, target, config=config, data_iterator=iterator if fits else None
            )
        except BaseException:
            iterator.close()
            raise
        return state, meta, iterator, data_start

    resumed = ckpts.restore_newest_intact(restore)
    if resumed is None:
        state = jax.jit(
            lambda: state_lib.create(init_params(), tx), out_shardings=state_shardings
        )()
        history: list[dict] = []
        data_start = 0
        iterator = new_iterator(0)
    else:
        step, (state, meta, iterator, data_start) = resumed
        history = meta["history"]
        logging.info("resumed from step %d in %s", step, ckpts.directory)

    start_step = int(jax.device_get(state.step))
    logging.info(
        "pretraining %d steps of %d frames (%d pairs) from step %d on %d pairs",
        total_steps,
        config.train.batch_size,
        2 * config.train.batch_size,
        start_step,
        2 * len(source),
    )
    pending = host_loop.PendingMetrics(max_in_flight=config.data.device_prefetch)
    t_start = time.time()
    losses: list[float] = []
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch, _ = next(iterator)
            state, step_metrics = step_fn(state, batch)
            pending.add(step, step_metrics, np.zeros(0))
            log = step % config.train.log_every_steps == 0 or step == total_steps
            every = config.train.checkpoint_every_steps
            save = step == total_steps or bool(every and step % every == 0)
            if not (log or save):
                continue
            records = pending.read()
            for record in records:
                if not record.metrics["finite"]:
                    raise FloatingPointError(
                        f"non-finite loss ({record.metrics['loss']}) or gradient norm "
                        f"({record.metrics['grad_norm']}) at pretraining step {record.step}; "
                        "the last checkpoint is untouched: lower config.optim.lr"
                    )
                losses.append(float(record.metrics["loss"]))
            last = records[-1]
            _log_step(last, total_steps, start_step, t_start, config.train.batch_size)
            history.append(
                {
                    "step": step,
                    "train_loss": float(np.mean(losses)),
                    "accuracy": float(last.metrics["accuracy"]),
                    "logit_scale": float(last.metrics["logit_scale"]),
                }
            )
            losses = []
            if jax.process_index() == 0:
                metrics.plot_pretrain_curves(history, workdir / "curves.png")
            if save:
                ckpts.save(
                    state,
                    config=config,
                    meta={
                        "fingerprint": fingerprint,
                        "history": history,
                        "data_iterator": _iterator_layout(config, data_start),
                        "code_version": checkpoint.code_version(),
                    },
                    data_iterator=iterator,
                )
    finally:
        ckpts.wait()
        ckpts.close()
        iterator.close()
    params = jax.device_get(state.params)
    seconds = time.time() - t_start
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
    logging.info(
        "pretrained %d steps in %.0f s; exported %s", total_steps - start_step, seconds, out
    )
    return {"export": out, "reused": False, "fingerprint": fingerprint}


def run(argv=()) -> None:
    config, workdir = _FLAGS["config"].value, _FLAGS["workdir"].value
    cli.start(argv, config=config, workdir=workdir)
    result = pretrain(config, workdir)
    if result["reused"]:
        print(f"{result['export']} is up to date (pretrained with this config and data): reused")
    else:
        print(f"pretrained CLIP exported to {result['export']}")


def main() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file.", lock_config=True
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, logs and the export."
    )
    cli.main(run)


if __name__ == "__main__":
    main()
