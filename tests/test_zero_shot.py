"""Zero-shot CLIP (`caer_jax.eval --zero_shot`): CLIP's own text embeddings of the class texts
against the clip's mean L2-normalised frame embeddings, written as every evaluation is."""

import functools
import json

import jax
import numpy as np
import pytest
import tiny_runs

from caer_jax import evaluation, label_sets, report, sharding
from caer_jax.data import pipeline
from caer_jax.models import caer
from caer_jax.models import clip as clip_lib
from caer_jax.models import tokenizer as tokenizer_lib
from caer_jax.prompts import TEXT_TYPES

T, SIZE = 3, 32


def _model_config(text_type: str, streams: str):
    config = evaluation.zero_shot_config(tiny_runs.config({}))
    c = config.model
    c.clip.image_size, c.clip.vision_layers, c.clip.text_layers = SIZE, 1, 1
    c.prompt.text_type, c.streams = text_type, streams
    return c


@functools.cache
def _clip_params() -> dict:
    """What zero-shot reads, initialised once for every case: CLIP's two towers and the prompt
    learner's context, empty (n_ctx = 0) whatever the text type. The temporal nets and fusion,
    which the cases' streams change, are left out: zero-shot has no use for them."""
    cfg = _model_config("class_descriptor", "both")
    model, _ = caer.build_model(cfg, tokenizer=tokenizer_lib.offline_tokenizer(), num_frames=T)
    params = caer.init_params(model, cfg, jax.random.key(0))
    return {name: params[name] for name in ("image_encoder", "text_encoder", "prompt_learner")}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "text_type, streams",
    [("class_descriptor", "both"), ("class_names", "face"), ("class_descriptor", "context")],
)
def test_logits_are_clip_cosines_of_the_class_texts_and_mean_frame_embeddings(text_type, streams):
    cfg = _model_config(text_type, streams)
    tok = tokenizer_lib.offline_tokenizer()
    model, _ = caer.build_model(cfg, tokenizer=tok, num_frames=T)
    params = _clip_params()
    face, context = (
        jax.random.uniform(k, (2, T, SIZE, SIZE, 3)) for k in jax.random.split(jax.random.key(1))
    )
    feed = {"both": (face, context), "face": (face, None), "context": (None, context)}[streams]
    zero_shot = jax.jit(functools.partial(model.apply, method="zero_shot"))
    logits, _ = zero_shot({"params": params}, *feed)

    # The same numbers through the plain CLIP towers: the class texts alone (no "X" context),
    # every frame of the used streams embedded (after the config's CLIP pixel normalisation),
    # normalised, averaged, normalised.
    assert cfg.pixel_normalization == "clip"
    towers_apply = jax.jit(clip_lib.CLIP(model.geometry).apply, static_argnames="method")
    towers = {"params": {"visual": params["image_encoder"], "text": params["text_encoder"]}}

    def encode_image(x):
        x = (x - np.asarray(caer.CLIP_PIXEL_MEAN)) / np.asarray(caer.CLIP_PIXEL_STD)
        return np.asarray(towers_apply(towers, x, method="encode_image"))

    ids = tokenizer_lib.tokenize(tok, TEXT_TYPES[text_type], model.geometry.context_length)
    text = _unit(np.asarray(towers_apply(towers, ids, method="encode_text")))
    frames = np.concatenate([x for x in feed if x is not None], axis=1)  # [2, T or 2T, ...]
    embedded = encode_image(frames.reshape(-1, SIZE, SIZE, 3))
    video = _unit(_unit(embedded).reshape(2, -1, embedded.shape[-1]).mean(1))
    np.testing.assert_allclose(logits, cfg.logit_scale * video @ text.T, atol=2e-4)
    # A clip of one frame repeated is that frame's CLIP classification.
    still = jax.numpy.repeat(face[:, :1], T, axis=1)
    single = _unit(encode_image(face[:, 0]))
    if streams == "face":
        repeated, _ = zero_shot({"params": params}, still, None)
        np.testing.assert_allclose(repeated, cfg.logit_scale * single @ text.T, atol=2e-4)


@pytest.mark.slow  # the evaluation loop
def test_zero_shot_evaluation_writes_a_report_row(tmp_path):
    config = tiny_runs.config(tiny_runs.overrides(tmp_path, num_clips=20))
    workdir = tmp_path / "zero_shot"
    summary = evaluation.evaluate_zero_shot(config, workdir, split="test")
    written = json.loads((workdir / "metrics.json").read_text())
    assert written["checkpoint"] == evaluation.ZERO_SHOT and written["step"] == 0
    assert written["train_config"]["model"]["prompt"]["n_ctx"] == 0
    assert config.model.prompt.n_ctx == 8  # the caller's config is left alone
    assert written["num_clips"] == summary["num_clips"] == 4  # the test split of 20 clips
    assert set(written["bootstrap"]) >= {"uar", "war", "recall", "confidence"}
    assert (workdir / "confusion_matrix.png").stat().st_size > 0
    rows = tiny_runs.read_predictions(workdir / "predictions.csv")
    assert len(rows) == 4
    probs = tiny_runs.probabilities(rows)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    names = label_sets.load(config.model.label_set).class_names
    labels = np.array([names.index(r["label"]) for _, r in sorted(rows.items())])
    assert 100 * np.mean(probs.argmax(-1) == labels) == pytest.approx(written["war"], abs=1e-3)
    line = next(x for x in report.table([workdir]).splitlines() if x.startswith(str(workdir)))
    assert line.split()[1:4] == ["both", "test", f"{written['uar']:.2f}"]

    # The class texts that reached the text encoder are those of the config's text type: the
    # written probabilities are those of a model given the descriptors' token ids directly, and
    # not those of one given the class names'.
    assert config.model.prompt.text_type == "class_descriptor"
    descriptors, names = (
        _zero_shot_probabilities(config, TEXT_TYPES[t]) for t in ("class_descriptor", "class_names")
    )
    np.testing.assert_allclose(probs, descriptors, atol=1e-5)  # written with 6 decimals
    assert not np.allclose(probs, names, atol=1e-3)


def _zero_shot_probabilities(config, texts) -> np.ndarray:
    """[clips, classes] zero-shot probabilities of the test split with `texts` as the class
    texts (tokenised here, not chosen by the config), sorted by video id as
    tiny_runs.probabilities sorts the written ones."""
    c = evaluation.zero_shot_config(config)
    tok = tokenizer_lib.load_tokenizer(c.model.clip)
    ids = tokenizer_lib.tokenize(tok, texts, c.model.clip.context_length)
    model, _ = caer.build_model(c.model, prompt_token_ids=ids, num_frames=c.data.num_segments)
    params = caer.init_params(model, c.model, jax.random.key(c.seed))
    mesh = sharding.make_mesh(c.mesh)
    step_fn = evaluation.make_eval_step(model, c, mesh, params, zero_shot=True)
    predicted = evaluation.predict_split(step_fn, params, c, "test", mesh)
    video_ids = pipeline.video_ids(c, "test")
    rows = dict(zip((video_ids[i] for i in predicted["index"]), predicted["probs"], strict=True))
    return np.array([rows[v] for v in sorted(rows)])
