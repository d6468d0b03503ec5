"""The authors' checkpoint format: conversion parity with an independent PyTorch forward.

The state dict is built with the key names and shapes of REFERENCE.md (tiny widths), and the
reference logits come from a PyTorch forward written here from REFERENCE.md's facts alone.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.functional as F

from caer_jax import checkpoint, convert
from caer_jax import state as state_lib
from caer_jax.models import caer
from caer_jax.models import tokenizer as tokenizer_lib
from caer_jax.models.clip_weights import WeightsError
from configs import synthetic_tiny

VW, TW, E = 128, 64, 64  # vision width (2 heads of 64), text width (1 head), embed dim
PATCH, IMG, CTX_LEN, VOCAB = 16, 32, 77, 300
N_CLS, N_CTX, T = 5, 8, 4
HEADS, HEAD_DIM, MLP = 4, 16, 128  # temporal nets (synthetic_tiny's)


def _block(sd, p, w, g):
    sd[f"{p}.attn.in_proj_weight"] = g(3 * w, w)
    sd[f"{p}.attn.in_proj_bias"] = g(3 * w)
    sd[f"{p}.attn.out_proj.weight"] = g(w, w)
    sd[f"{p}.attn.out_proj.bias"] = g(w)
    for ln in ("ln_1", "ln_2"):
        sd[f"{p}.{ln}.weight"] = 1 + g(w)
        sd[f"{p}.{ln}.bias"] = g(w)
    sd[f"{p}.mlp.c_fc.weight"] = g(4 * w, w)
    sd[f"{p}.mlp.c_fc.bias"] = g(4 * w)
    sd[f"{p}.mlp.c_proj.weight"] = g(w, 4 * w)
    sd[f"{p}.mlp.c_proj.bias"] = g(w)


def _temporal(sd, p, g, e=E, t=T, inner=HEADS * HEAD_DIM, mlp=MLP):
    sd[f"{p}.cls_token"] = torch.randn(1, 1, e)
    sd[f"{p}.pos_embedding"] = torch.randn(1, t + 1, e)
    q = f"{p}.temporal_transformer.layers.0"
    sd[f"{q}.0.fn.norm.weight"], sd[f"{q}.0.fn.norm.bias"] = 1 + g(e), g(e)
    sd[f"{q}.0.fn.fn.to_qkv.weight"] = g(3 * inner, e)
    sd[f"{q}.0.fn.fn.to_out.0.weight"], sd[f"{q}.0.fn.fn.to_out.0.bias"] = g(e, inner), g(e)
    sd[f"{q}.1.fn.norm.weight"], sd[f"{q}.1.fn.norm.bias"] = 1 + g(e), g(e)
    sd[f"{q}.1.fn.fn.net.0.weight"], sd[f"{q}.1.fn.fn.net.0.bias"] = g(mlp, e), g(mlp)
    sd[f"{q}.1.fn.fn.net.3.weight"], sd[f"{q}.1.fn.fn.net.3.bias"] = g(e, mlp), g(e)


def official_state_dict(
    seed=0,
    *,
    vw=VW,
    tw=TW,
    e=E,
    patch=PATCH,
    img=IMG,
    vocab=VOCAB,
    layers=2,
    t=T,
    inner=HEADS * HEAD_DIM,
    mlp=MLP,
    ids=None,
):
    """A CLIP-CAER state dict with REFERENCE.md's names and shapes, plus the prompt token ids."""
    torch.manual_seed(seed)
    g = lambda *s: torch.randn(*s) * 0.05  # noqa: E731
    sd = {}
    # CLIP (OpenAI names), then shared under image_encoder./text_encoder.
    clip = {
        "visual.conv1.weight": g(vw, 3, patch, patch),
        "visual.class_embedding": g(vw),
        "visual.positional_embedding": g((img // patch) ** 2 + 1, vw),
        "visual.proj": g(vw, e),
        "token_embedding.weight": g(vocab, tw),
        "positional_embedding": g(CTX_LEN, tw),
        "text_projection": g(tw, e),
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    for ln, w in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        clip[f"{ln}.weight"], clip[f"{ln}.bias"] = 1 + g(w), g(w)
    for i in range(layers):
        _block(clip, f"visual.transformer.resblocks.{i}", vw, g)
        _block(clip, f"transformer.resblocks.{i}", tw, g)
    sd.update({f"clip_model_.{k}": v for k, v in clip.items()})
    sd.update({f"image_encoder.{k[7:]}": v for k, v in clip.items() if k.startswith("visual.")})
    for k, v in clip.items():
        if k.startswith(("transformer.", "positional_embedding", "ln_final", "text_projection")):
            sd[f"text_encoder.{k}"] = v
    if ids is None:  # <start> X*8 class tokens <end> 0...; end = last row of the table.
        rng = np.random.default_rng(seed)
        ids = np.zeros((N_CLS, CTX_LEN), np.int64)
        for c, n in enumerate((5, 3, 9, 7, 12)):
            ids[c, 0] = vocab - 2
            ids[c, 1 : 1 + N_CTX] = 7
            ids[c, 1 + N_CTX : 1 + N_CTX + n] = rng.integers(1, vocab - 2, n)
            ids[c, 1 + N_CTX + n] = vocab - 1
    emb = clip["token_embedding.weight"][torch.from_numpy(np.asarray(ids, np.int64))]
    sd["prompt_learner.ctx"] = torch.randn(N_CLS, N_CTX, tw) * 0.02
    sd["prompt_learner.token_prefix"] = emb[:, :1].clone()
    sd["prompt_learner.token_suffix"] = emb[:, 1 + N_CTX :].clone()
    for net in ("temporal_net", "temporal_net_body"):
        _temporal(sd, net, g, e, t, inner, mlp)
    sd["project_fc.weight"], sd["project_fc.bias"] = g(e, 2 * e), g(e)
    return sd, ids


# ---- the reference forward, from REFERENCE.md ----------------------------------------------------


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _resblock(x, sd, p, heads, mask=None):
    mha = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
    mha.load_state_dict(
        {
            k: sd[f"{p}.attn.{k}"]
            for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        }
    )
    h = _ln(x, sd, f"{p}.ln_1")
    x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.linear(_ln(x, sd, f"{p}.ln_2"), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])


def _encode_image(sd, x):  # [N, 3, H, W]
    p = "image_encoder"
    x = F.conv2d(x, sd[f"{p}.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd[f"{p}.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd[f"{p}.positional_embedding"]
    x = _ln(x, sd, f"{p}.ln_pre")
    for i in range(2):
        x = _resblock(x, sd, f"{p}.transformer.resblocks.{i}", VW // 64)
    return _ln(x[:, 0], sd, f"{p}.ln_post") @ sd[f"{p}.proj"]


def _encode_text(sd, prompts, ids):
    p = "text_encoder"
    x = prompts + sd[f"{p}.positional_embedding"]
    mask = torch.full((CTX_LEN, CTX_LEN), float("-inf")).triu(1)
    for i in range(2):
        x = _resblock(x, sd, f"{p}.transformer.resblocks.{i}", TW // 64, mask)
    x = _ln(x, sd, f"{p}.ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd[f"{p}.text_projection"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _temporal_forward(sd, p, x):  # [B, T, E]
    x = (
        torch.cat([sd[f"{p}.cls_token"].expand(x.shape[0], -1, -1), x], 1)
        + sd[f"{p}.pos_embedding"]
    )
    q = f"{p}.temporal_transformer.layers.0"
    h = _ln(x, sd, f"{q}.0.fn.norm")
    qkv = F.linear(h, sd[f"{q}.0.fn.fn.to_qkv.weight"]).chunk(3, -1)
    b, n, _ = h.shape
    qh, kh, vh = (t.reshape(b, n, HEADS, HEAD_DIM).transpose(1, 2) for t in qkv)
    att = (qh @ kh.transpose(-1, -2) * HEAD_DIM**-0.5).softmax(-1)
    out = (att @ vh).transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM)
    x = x + F.linear(out, sd[f"{q}.0.fn.fn.to_out.0.weight"], sd[f"{q}.0.fn.fn.to_out.0.bias"])
    h = _ln(x, sd, f"{q}.1.fn.norm")
    h = _gelu_tanh(F.linear(h, sd[f"{q}.1.fn.fn.net.0.weight"], sd[f"{q}.1.fn.fn.net.0.bias"]))
    x = x + F.linear(h, sd[f"{q}.1.fn.fn.net.3.weight"], sd[f"{q}.1.fn.fn.net.3.bias"])
    return x[:, 0]


def reference_logits(sd, ids, face, context):
    """face/context [B, T, H, W, 3] numpy in [0, 1] -> logits [B, n_cls]."""
    with torch.no_grad():
        b = face.shape[0]
        feats = []
        for clip, net in ((face, "temporal_net"), (context, "temporal_net_body")):
            x = torch.from_numpy(clip).reshape(b * T, IMG, IMG, 3).permute(0, 3, 1, 2)
            feats.append(_temporal_forward(sd, net, _encode_image(sd, x).reshape(b, T, E)))
        v = F.linear(torch.cat(feats, -1), sd["project_fc.weight"], sd["project_fc.bias"])
        v = v / v.norm(dim=-1, keepdim=True)
        prompts = torch.cat(
            [
                sd["prompt_learner.token_prefix"],
                sd["prompt_learner.ctx"],
                sd["prompt_learner.token_suffix"],
            ],
            1,
        )
        t = _encode_text(sd, prompts, torch.from_numpy(ids))
        t = t / t.norm(dim=-1, keepdim=True)
        return (v @ t.T / 0.01).numpy()


def _model_cfg():
    cfg = synthetic_tiny.get_config("scratch").model
    cfg.temporal.heads, cfg.temporal.head_dim = HEADS, HEAD_DIM
    # CLIP heads: text width 64 matches the config, whose heads are used (1, as the reference);
    # vision width 128 does not (config 64), so heads come from OpenAI's rule 128 // 64 = 2.
    cfg.clip.text_heads = 1
    return cfg


def test_conversion_parity_with_reference_forward(tmp_path):
    sd, ids = official_state_dict()
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 3, "state_dict": sd, "best_acc": 0.5, "optimizer": {"state": {}}}, path)
    model, params, overrides = convert.convert_official(path, _model_cfg())
    assert overrides["model.clip.vision_width"] == VW and overrides["model.clip.vision_heads"] == 2
    assert overrides["model.clip.text_heads"] == 1 and overrides["model.clip.patch_size"] == PATCH
    assert overrides["model.clip.image_size"] == IMG and overrides["model.clip.vocab_size"] == VOCAB
    assert overrides["model.prompt.n_ctx"] == N_CTX and overrides["model.prompt.class_specific"]
    assert overrides["data.num_segments"] == T and overrides["model.streams"] == "both"
    assert overrides["model.temporal.mlp_dim"] == MLP
    assert overrides["model.pixel_normalization"] == "none"  # the authors feed [0, 1] pixels
    got_ids = np.asarray(model.prompt_token_ids)
    np.testing.assert_array_equal(got_ids.argmax(-1), ids.argmax(-1))
    np.testing.assert_array_equal(got_ids[:, 1 + N_CTX :], ids[:, 1 + N_CTX :])
    assert set(params) == {
        "image_encoder",
        "text_encoder",
        "prompt_learner",
        "temporal_face",
        "temporal_context",
        "project_fc",
    }
    rng = np.random.default_rng(1)
    face, context = (rng.uniform(0, 1, (2, T, IMG, IMG, 3)).astype(np.float32) for _ in range(2))
    ref = reference_logits(sd, ids, face, context)
    logits, _ = jax.jit(lambda p, f, c: model.apply({"params": p}, f, c, train=False))(
        params, face, context
    )
    rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
    print(f"official-format parity: max|d|/max|ref| = {rel:.2e}")
    assert rel <= 1e-4


class RecorderMeter:
    """Stands for the authors' utils.RecorderMeter (a metrics history saved in model_best.pth)."""

    marker = ""

    def __init__(self):
        self.epoch_losses = np.zeros((3, 2), np.float32)

    def __setstate__(self, state):
        with open(self.marker, "w") as f:
            f.write("setstate ran")


def test_recorder_object_is_inert_and_payload_refused(tmp_path):
    sd, _ = official_state_dict()
    marker = tmp_path / "ran"

    RecorderMeter.marker = str(marker)

    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": sd, "recorder": RecorderMeter()}, path)
    model, params, _ = convert.convert_official(path, _model_cfg())
    assert not marker.exists() and "project_fc" in params

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": sd, "x": Payload()}, path)
    with pytest.raises(WeightsError, match="refused"):
        convert.convert_official(path, _model_cfg())
    assert not marker.exists()


def test_errors_name_key_and_shapes():
    sd, _ = official_state_dict()
    bad = dict(sd, **{"temporal_net.extra": torch.zeros(2)})
    with pytest.raises(WeightsError, match=r"temporal_net: unexpected key 'extra'"):
        convert.convert_state_dict(bad, _model_cfg())
    bad = dict(sd, **{"foo.bar": torch.zeros(2, 3)})
    with pytest.raises(WeightsError, match=r"unexpected key 'foo.bar' with shape \(2, 3\)"):
        convert.convert_state_dict(bad, _model_cfg())
    bad = {k: v for k, v in sd.items() if k != "image_encoder.ln_post.bias"}
    with pytest.raises(WeightsError, match="missing key 'visual.ln_post.bias'"):
        convert.convert_state_dict(bad, _model_cfg())
    bad = dict(sd, **{"project_fc.bias": torch.zeros(E + 1)})
    with pytest.raises(WeightsError, match=r"project_fc/bias: checkpoint \(65,\), model \(64,\)"):
        convert.convert_state_dict(bad, _model_cfg())
    bad = dict(sd)
    bad["prompt_learner.token_suffix"] = sd["prompt_learner.token_suffix"] + 1e-3
    with pytest.raises(WeightsError, match=r"token_suffix row \(0, 0\) equals no row"):
        convert.convert_state_dict(bad, _model_cfg())
    cfg = _model_cfg()
    cfg.temporal.heads = 8
    with pytest.raises(WeightsError, match="config.model.temporal.heads 8"):
        convert.convert_state_dict(sd, cfg)


def test_clip_heads_given_are_used_or_refused_never_ignored():
    # The file's vision width is 128, the config's 64 (2 heads); its text width is the config's.
    sd, _ = official_state_dict()
    cfg = _model_cfg()
    cfg.clip.vision_heads = 4
    _, _, overrides = convert.convert_state_dict(sd, cfg)  # the config's heads were for 64
    assert overrides["model.clip.vision_heads"] == 2  # OpenAI's rule 128 // 64
    model, _, overrides = convert.convert_state_dict(sd, cfg, {"model.clip.vision_heads"})
    assert overrides["model.clip.vision_heads"] == model.geometry.vision_heads == 4
    cfg.clip.vision_heads = 3
    with pytest.raises(
        WeightsError,
        match=r"config.model.clip.vision_heads=3 heads do not divide the checkpoint's vision "
        r"width 128 \(config.model.clip.vision_width is 64\)",
    ):
        convert.convert_state_dict(sd, cfg, {"model.clip.vision_heads"})
    cfg = _model_cfg()
    cfg.clip.text_heads = 3  # the config's width is the file's: its heads apply, and must fit
    with pytest.raises(WeightsError, match="text_heads=3 heads do not divide .* text width 64"):
        convert.convert_state_dict(sd, cfg)


# ---- the CLI: an orbax checkpoint that eval and train restore ------------------------------------


def _tiny_official(tmp_path, config):
    c = config.model.clip
    tok = tokenizer_lib.offline_tokenizer()
    ids = tokenizer_lib.tokenize(tok, caer.prompt_texts(config.model), c.context_length)
    sd, _ = official_state_dict(
        vw=c.vision_width,
        tw=c.text_width,
        e=c.embed_dim,
        patch=c.patch_size,
        img=c.image_size,
        vocab=c.vocab_size,
        layers=c.vision_layers,
        t=config.data.num_segments,
        inner=config.model.temporal.heads * config.model.temporal.head_dim,
        mlp=config.model.temporal.mlp_dim,
        ids=ids,
    )
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 20, "state_dict": sd, "best_acc": 0.6}, path)
    return path, sd


@pytest.mark.slow  # the command in its own process
def test_cli_writes_a_checkpoint_that_restores(tmp_path):
    config = synthetic_tiny.get_config("scratch")
    path, sd = _tiny_official(tmp_path, config)
    changed = convert.main_convert(path, config, tmp_path / "run")
    # the tiny config already has the geometry; only the authors' [0, 1] pixel input differs
    assert changed == {"model.pixel_normalization": ("clip", "none")}
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    abstract = state_lib.abstract_state(model, config, steps_per_epoch=1)
    ckpts = checkpoint.Checkpoints(tmp_path / "run", read_only=True)
    step = ckpts.resolve_step("latest")
    restored = ckpts.restore(step, abstract)
    state, meta = restored[0], restored[-1]
    saved_config = ckpts.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    ).config
    ckpts.close()
    assert step == 0 and meta["epoch"] == 0 and "official" in meta["protocol"]
    assert saved_config["model"]["clip"]["vision_width"] == 64
    ctx = sd["prompt_learner.ctx"].numpy()
    np.testing.assert_array_equal(state.params["prompt_learner"]["ctx"], ctx)
    np.testing.assert_array_equal(
        state.params["project_fc"]["kernel"], sd["project_fc.weight"].numpy().T
    )
    face = np.random.default_rng(0).uniform(0, 1, (1, 8, 64, 64, 3)).astype(np.float32)
    logits, _ = jax.jit(lambda p: model.apply({"params": p}, face, face))(state.params)
    assert np.isfinite(logits).all()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert.main_convert(path, synthetic_tiny.get_config("scratch"), tmp_path / "run")


@pytest.mark.slow  # the command in its own process
def test_cli_converts_with_the_heads_given_and_records_them(tmp_path):
    # The case: text heads given on the command line, the config file's width another.
    config = synthetic_tiny.get_config("scratch")
    config.model.clip.text_width = 128  # the file's; the config file has 64 (2 heads)
    path, _ = _tiny_official(tmp_path, config)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            *(sys.executable, "-m", "caer_jax.convert", f"--official={path}"),
            *(
                f"--config={repo / 'configs/synthetic_tiny.py:scratch'}",
                f"--workdir={tmp_path / 'run'}",
            ),
            *("--config.model.clip.text_heads=4", "--compilation_cache="),
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--config.model.clip.text_width=128", "--config.model.clip.text_heads=4"):
        assert flag in result.stdout  # what train and eval must be given
    ckpts = checkpoint.Checkpoints(tmp_path / "run", read_only=True)
    clip = ckpts.read_config(0)["model"]["clip"]
    ckpts.close()
    assert (clip["text_width"], clip["text_heads"]) == (128, 4)  # not OpenAI's 128 // 64


@pytest.mark.slow  # the command in its own process
def test_cli_refuses_prompts_that_train_would_not_rebuild(tmp_path):
    config = synthetic_tiny.get_config("scratch")
    path, _ = _tiny_official(tmp_path, config)
    config.model.prompt.text_type = "class_names"
    with pytest.raises(WeightsError, match="class 0: config.model.prompt.text_type='class_names'"):
        convert.main_convert(path, config, tmp_path / "run")
