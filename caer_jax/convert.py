"""Convert the authors' CLIP-CAER checkpoint (model_best.pth) into this model.

  python -m caer_jax.convert --official model_best.pth --config=configs/clip_caer_b32.py \
      --workdir=runs/official

Everything the model needs is read off the checkpoint itself (REFERENCE.md, "The official
checkpoint format"): CLIP geometry from the tensor shapes, n_cls and n_ctx from
`prompt_learner.ctx`, the prompt token ids (hence the EOT positions) by finding every
`token_prefix`/`token_suffix` row in the token embedding table, and the clip length from the
temporal positional embedding. No tokenizer is needed. Values that shapes cannot tell come from
the config: attention heads (CLIP towers: those given on the command line, else the config's
where its width matches the checkpoint's, else OpenAI's rule width // 64, and an error where they
do not divide the checkpoint's width; temporal nets: the config's), the class-token position,
dropout.

The written checkpoint is a step-0 train state (params + fresh optimizer state) in workdir's
orbax CheckpointManager: `python -m caer_jax.eval --step=latest` evaluates it and
`python -m caer_jax.train` resumes from it. Its metadata records the prompt token ids, which eval,
predict and train take from there: none of them needs a tokenizer or a network. Where the
config's tokenizer can be loaded, the CLI checks that the config's text type gives the same ids
(so that the class texts recorded beside them are the right ones).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from caer_jax import cli, config_files, errors, label_sets
from caer_jax.models import caer, clip_weights
from caer_jax.models.clip_weights import WeightsError, _np

# Top-level key groups of the official state dict; anything else is an error.
_GROUPS = (
    "prompt_learner.",
    "image_encoder.",
    "text_encoder.",
    "temporal_net.",
    "temporal_net_body.",
    "project_fc.",
    "clip_model_.",
)


def load_official_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The `state_dict` of a model_best.pth (torch.load weights_only=True), `module.` stripped."""
    ckpt = clip_weights.load_torch_file(path, inert_classes=True)
    sd = ckpt["state_dict"] if isinstance(ckpt, Mapping) and "state_dict" in ckpt else ckpt
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path}: expected a dict with a 'state_dict', got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _clip_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI-named CLIP tensors: the trained image encoder and the (frozen) text encoder."""
    out = {}
    for k, v in sd.items():
        if k.startswith("image_encoder."):
            out["visual." + k[len("image_encoder.") :]] = v
        elif k.startswith("text_encoder."):
            out[k[len("text_encoder.") :]] = v
    if not any(k.startswith("visual.") for k in out):  # fall back to the CLIP copy
        out.update({k[12:]: v for k, v in sd.items() if k.startswith("clip_model_.visual.")})
    key = "clip_model_.token_embedding.weight"
    if key not in sd:
        raise WeightsError(f"missing key {key!r} (needed to recover the prompt token ids)")
    out["token_embedding.weight"] = sd[key]
    return out


def _row_ids(rows: np.ndarray, table: np.ndarray, what: str) -> np.ndarray:
    """Index in `table` [V, W] of every row of `rows` [..., W], by exact equality."""
    flat = rows.reshape(-1, rows.shape[-1])
    ids = np.empty(len(flat), np.int64)
    col0 = table[:, 0]
    for i, row in enumerate(flat):
        candidates = np.flatnonzero(col0 == row[0])
        match = [c for c in candidates if np.array_equal(table[c], row)]
        if not match:
            pos = np.unravel_index(i, rows.shape[:-1])
            raise WeightsError(
                f"{what} row {tuple(int(p) for p in pos)} equals no row of "
                "clip_model_.token_embedding.weight; cannot recover the prompt token ids"
            )
        # Duplicate rows are ambiguous only for the end token, which must win (EOT = argmax).
        ids[i] = len(table) - 1 if len(table) - 1 in match else match[0]
    return ids.reshape(rows.shape[:-1])


def prompt_token_ids(sd: Mapping[str, Any]) -> np.ndarray:
    """Token ids [n_cls, context_length] of the prompts, from the prompt learner's buffers.

    The context slots (which the learned ctx replaces) get id 0; the EOT index is the argmax
    (CLIP's end token has the largest id: the last row of the table).
    """
    table = _np(sd["clip_model_.token_embedding.weight"])
    prefix = _np(sd["prompt_learner.token_prefix"])
    suffix = _np(sd["prompt_learner.token_suffix"])
    ctx = _np(sd["prompt_learner.ctx"])
    n_cls, n_ctx = prefix.shape[0], ctx.shape[-2]
    ids = np.zeros((n_cls, 1 + n_ctx + suffix.shape[1]), np.int64)
    ids[:, :1] = _row_ids(prefix, table, "prompt_learner.token_prefix")
    ids[:, 1 + n_ctx :] = _row_ids(suffix, table, "prompt_learner.token_suffix")
    return ids


def _temporal(sd: Mapping[str, Any], prefix: str) -> tuple[dict, dict]:
    """Params of one temporal net and the sizes its shapes imply."""
    src = clip_weights._Source(
        {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, prefix.rstrip(".")
    )
    p: dict = {"cls_token": src.get("cls_token"), "pos_embedding": src.get("pos_embedding")}
    depth = clip_weights._layer_count(src.tensors, r"temporal_transformer\.layers\.(\d+)\.")
    for i in range(depth):
        a = f"temporal_transformer.layers.{i}.0.fn"
        m = f"temporal_transformer.layers.{i}.1.fn"
        p[f"layers_{i}"] = {
            "attn_norm": {"scale": src.get(f"{a}.norm.weight"), "bias": src.get(f"{a}.norm.bias")},
            "to_qkv": {"kernel": src.get(f"{a}.fn.to_qkv.weight").T},
            "to_out": {
                "kernel": src.get(f"{a}.fn.to_out.0.weight").T,
                "bias": src.get(f"{a}.fn.to_out.0.bias"),
            },
            "mlp_norm": {"scale": src.get(f"{m}.norm.weight"), "bias": src.get(f"{m}.norm.bias")},
            "fc1": {
                "kernel": src.get(f"{m}.fn.net.0.weight").T,
                "bias": src.get(f"{m}.fn.net.0.bias"),
            },
            "fc2": {
                "kernel": src.get(f"{m}.fn.net.3.weight").T,
                "bias": src.get(f"{m}.fn.net.3.bias"),
            },
        }
    src.check_all_used()
    sizes = {
        "depth": depth,
        "inner": p["layers_0"]["to_qkv"]["kernel"].shape[1] // 3 if depth else 0,
        "mlp_dim": p["layers_0"]["fc1"]["kernel"].shape[1] if depth else 0,
        "num_frames": p["pos_embedding"].shape[1] - 1,
    }
    return p, sizes


def _clip_heads(
    geometry: clip_weights.CLIPGeometry, clip_cfg: ml_collections.ConfigDict, given: Collection[str]
) -> dict[str, int]:
    """The attention heads of each CLIP tower, which the shapes cannot tell: a head count the
    user gave (a key of `given`); else the config's where its width is the checkpoint's; else
    OpenAI's rule, width // 64. A count that does not split the checkpoint's width is refused,
    as the model would silently be another one."""
    heads = {}
    for tower in ("vision", "text"):
        key, width = f"{tower}_heads", getattr(geometry, f"{tower}_width")
        configured = clip_cfg[f"{tower}_width"] == width
        if f"model.clip.{key}" in given or configured:
            count, source = clip_cfg[key], f"config.model.clip.{key}={clip_cfg[key]}"
        else:
            count, source = getattr(geometry, key), f"OpenAI's rule {width} // 64"
        if count < 1 or width % count:
            raise WeightsError(
                f"{source} heads do not divide the checkpoint's {tower} width {width} "
                f"(config.model.clip.{tower}_width is {clip_cfg[f'{tower}_width']}); give "
                f"--config.model.clip.{key}=N with N dividing {width}"
            )
        heads[key] = count
    return heads


def convert_state_dict(
    sd: Mapping[str, Any],
    model_cfg: ml_collections.ConfigDict | None = None,
    given: Collection[str] = (),
) -> tuple[caer.CLIPCAER, dict, dict[str, Any]]:
    """(model, params, overrides) from an official state dict; see `convert_official`."""
    if model_cfg is None:
        model_cfg = config_files.load("clip_caer_b32").get_config().model
    cfg = copy.deepcopy(model_cfg)
    unknown = sorted(k for k in sd if not k.startswith(_GROUPS))
    if unknown:
        raise WeightsError(
            f"unexpected key {unknown[0]!r} with shape {tuple(_np(sd[unknown[0]]).shape)} "
            f"(expected only keys under {', '.join(_GROUPS)})"
        )
    clip_params, geometry = clip_weights.from_openai_state_dict(
        _clip_state_dict(sd), what="official checkpoint (image_encoder./text_encoder.)"
    )
    geometry = dataclasses.replace(geometry, **_clip_heads(geometry, cfg.clip, given))
    ctx = _np(sd["prompt_learner.ctx"]).astype(np.float32, copy=False)
    ids = prompt_token_ids(sd)
    overrides: dict[str, Any] = {f"model.clip.{k}": v for k, v in geometry.__dict__.items()}
    # The authors feed [0, 1] pixels to CLIP: their weights expect no mean/std normalisation.
    overrides["model.pixel_normalization"] = "none"
    overrides["model.prompt.n_ctx"] = int(ctx.shape[-2])
    overrides["model.prompt.class_specific"] = ctx.ndim == 3
    has_face, has_ctx = (
        any(k.startswith(p) for k in sd) for p in ("temporal_net.", "temporal_net_body.")
    )
    streams = "both" if has_face and has_ctx else "face" if has_face else "context"
    overrides["model.streams"] = streams
    params: dict = {
        "image_encoder": clip_params["visual"],
        "text_encoder": clip_params["text"],
        "prompt_learner": {"ctx": ctx},
    }
    sizes = {}
    for prefix, name in (
        ("temporal_net.", "temporal_face"),
        ("temporal_net_body.", "temporal_context"),
    ):
        if any(k.startswith(prefix) for k in sd):
            params[name], sizes = _temporal(sd, prefix)
    if streams == "both":
        params["project_fc"] = {
            "kernel": _np(sd["project_fc.weight"]).astype(np.float32).T,
            "bias": _np(sd["project_fc.bias"]).astype(np.float32),
        }
    elif any(k.startswith("project_fc.") for k in sd):
        raise WeightsError("project_fc.* present but only one temporal net")
    overrides["model.temporal.depth"] = sizes["depth"]
    overrides["model.temporal.mlp_dim"] = sizes["mlp_dim"]
    overrides["data.num_segments"] = sizes["num_frames"]
    if cfg.temporal.heads * cfg.temporal.head_dim != sizes["inner"]:
        raise WeightsError(
            f"temporal attention width {sizes['inner']} (to_qkv) != config.model.temporal.heads "
            f"{cfg.temporal.heads} x head_dim {cfg.temporal.head_dim}"
        )
    apply_overrides(cfg, {k[6:]: v for k, v in overrides.items() if k.startswith("model.")})
    model, _ = caer.build_model(cfg, prompt_token_ids=ids, num_frames=sizes["num_frames"])
    x = caer.dummy_clip(model, sizes["num_frames"])
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False)["params"])
    checked = {}
    for name in abstract:
        if name not in params:
            raise WeightsError(f"missing parameters {name} in the checkpoint")
        checked[name] = clip_weights.merge_checked(abstract[name], params[name], name)
    for name in params:
        if name not in abstract:
            raise WeightsError(f"unexpected parameters {name} for streams={streams!r}")
    return model, checked, overrides


def convert_official(
    path: str | os.PathLike,
    model_cfg: ml_collections.ConfigDict | None = None,
    given: Collection[str] = (),
) -> tuple[caer.CLIPCAER, dict, dict[str, Any]]:
    """Read an official model_best.pth: returns (model, params, overrides).

    `params` is the parameter tree of `model` (numpy float32); `overrides` maps config keys
    ("model.clip.vision_width", "model.prompt.n_ctx", "data.num_segments", ...) to the values read
    off the checkpoint, to apply to a config before training or evaluating with these params.
    `model_cfg` (default: the paper's) supplies what shapes cannot tell (temporal heads, class
    token position, dropout, logit scale, dtype); CLIP heads as `_clip_heads` says, where
    `given` holds the config keys that the user set (the command line's overrides).
    """
    try:
        return convert_state_dict(load_official_state_dict(path), model_cfg, given)
    except WeightsError as e:
        if os.fspath(path) in str(e):
            raise
        raise WeightsError(
            f"{path}: cannot convert (is it the authors' model_best.pth?): {e}"
        ) from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Set every dotted key of `overrides` in `config` (in place)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


class WorkdirNotEmptyError(errors.UserError, FileExistsError):
    """The workdir to convert into already holds checkpoints."""


def check_prompts_reproducible(model: caer.CLIPCAER, config: ml_collections.ConfigDict) -> bool:
    """The config's prompt texts, tokenised, must give the checkpoint's ids (else the class texts
    recorded with them would be wrong). Returns False, after a warning, when the tokenizer cannot
    be loaded (e.g. a hub id without a network): the ids do not need it."""
    from caer_jax.models import tokenizer as tokenizer_lib

    try:
        tok = tokenizer_lib.load_tokenizer(config.model.clip)
    except errors.UserError as e:
        logging.warning(
            "prompt texts not checked against the checkpoint's token ids (%s); the recorded class "
            "texts are those of config.model.prompt.text_type=%r",
            e,
            config.model.prompt.text_type,
        )
        return False
    ids = tokenizer_lib.tokenize(
        tok, caer.prompt_texts(config.model), config.model.clip.context_length
    )
    want = np.asarray(model.prompt_token_ids)
    n_ctx = config.model.prompt.n_ctx
    for i in range(len(want)):
        mine = np.concatenate([ids[i, :1], ids[i, 1 + n_ctx :]])
        theirs = np.concatenate([want[i, :1], want[i, 1 + n_ctx :]])
        if not np.array_equal(mine, theirs):
            raise WeightsError(
                f"class {i}: config.model.prompt.text_type={config.model.prompt.text_type!r} with "
                f"the tokenizer of {config.model.clip.source!r} gives prompt ids "
                f"{mine[: int(mine.argmax()) + 1].tolist()}, the checkpoint has "
                f"{theirs[: int(theirs.argmax()) + 1].tolist()}"
            )
    return True


def write_checkpoint(
    params: dict, config: ml_collections.ConfigDict, workdir: str | os.PathLike, meta: dict
) -> int:
    """Save `params` as a step-0 train state in workdir (refuses a workdir with checkpoints)."""
    import jax.numpy as jnp

    from caer_jax import checkpoint, optim
    from caer_jax import state as state_lib

    ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
    try:
        if ckpts.manager.latest_step() is not None:
            raise WorkdirNotEmptyError(
                f"{ckpts.directory} already holds checkpoints (steps {ckpts.manager.all_steps()}); "
                "convert into an empty workdir"
            )
        params = jax.tree.map(jnp.asarray, params)
        # The optimizer state's structure does not depend on the schedule's steps per epoch.
        tx = optim.make_optimizer(
            params,
            config.optim,
            steps_per_epoch=1,
            freeze_image_encoder=config.model.freeze_image_encoder,
        )
        state = state_lib.create(params, tx)
        ckpts.save(state, config=config, meta=meta, force=True)
        ckpts.wait()
        return int(state.step)
    finally:
        ckpts.close()


def main_convert(
    official: str | os.PathLike,
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    given: Collection[str] = (),
) -> dict[str, tuple[Any, Any]]:
    """The CLI: convert, set the config from the checkpoint, check prompts, write (the config
    saved beside the weights holds the geometry used, heads included); returns the config values
    that the checkpoint changed or the command line gave ({key: (config's, checkpoint's)}): what
    train and eval must be given too. `given`: as convert_official."""
    model, params, overrides = convert_official(official, config.model, given)
    changed = {}
    for key, value in overrides.items():
        node = config
        for part in key.split(".")[:-1]:
            node = node[part]
        old = node[key.split(".")[-1]]
        if old != value or key in given:  # a given head count: not in the config file either
            changed[key] = (old, value)
    from caer_jax import checkpoint

    apply_overrides(config, overrides)
    check_prompts_reproducible(model, config)
    meta = {
        "epoch": 0,
        "selection_split": config.train.selection_split,
        "protocol": f"converted from the official checkpoint {os.fspath(official)}",
        "metrics": None,
        "history": [],
        "skipped_nonfinite_steps": 0,
        "converted_from": os.fspath(official),
        "class_names": list(label_sets.load(config.model.label_set).class_names),
        "prompt": checkpoint.prompt_record(config.model, model.prompt_token_ids),
    }
    write_checkpoint(params, config, workdir, meta)
    return changed


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "official": flags.DEFINE_string("official", None, "The authors' model_best.pth."),
        "workdir": flags.DEFINE_string("workdir", None, "Empty workdir for the orbax checkpoint."),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    official, config, workdir = flag.official.value, flag.config.value, flag.workdir.value
    cli.start(argv, official=official, config=config, workdir=workdir)
    # The config keys set on the command line ("model.clip.text_heads"): a head count given there
    # applies to the checkpoint's width, whatever width the config file has.
    given = set(config_flags.get_override_values(flags.FLAGS[flag.config.name]))
    changed = main_convert(official, config, workdir, given)
    print(f"wrote step 0 to {workdir}/checkpoints")
    if changed:
        print("the checkpoint differs from the config; pass these to train/eval:")
        print(" ".join(f"--config.{k}={v[1]}" for k, v in changed.items()))
    print(f"evaluate: python -m caer_jax.eval --config=... --workdir={workdir} --step=latest")


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
