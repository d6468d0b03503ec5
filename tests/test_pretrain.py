"""CLIP pretraining on synthetic captions: the captions, a few steps, exact resume, reuse of the
export, its parity with transformers' CLIPModel, and errors for bad input."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from caer_jax import checkpoint, errors, pretrain, prompts
from caer_jax.data import captions, pretrain_data, synthetic
from caer_jax.models import caer, clip, clip_weights, contrastive, export
from caer_jax.models import tokenizer as tokenizer_lib
from configs import pretrain_tiny

CLASS_WORDS = ("neutral", "enjoy", "confus", "fatigu", "distract")


def _drawn_clips(seed: int = 5):
    """Clips of every class and variant, drawn as the pretraining set draws them."""
    rng = np.random.default_rng(seed)
    for i in range(40):
        label = i % len(prompts.CLASS_NAMES)
        clip_rng = np.random.default_rng([seed, pretrain_data.PRETRAIN_STREAM, i])
        yield rng, synthetic.draw_clip(clip_rng, label, 10, 160, 120)


def test_captions_never_name_a_class_nor_hold_a_class_text():
    class_texts = [
        " ".join(t.lower().replace(",", ", ").split())
        for texts in prompts.TEXT_TYPES.values()
        for t in texts
    ]
    seen = set()
    for rng, drawn in _drawn_clips():
        for t in range(len(drawn.frames)):
            for write in (captions.face_caption, captions.context_caption):
                text = write(rng, drawn, t)
                seen.add(text)
                low = text.lower()
                assert not any(w in low for w in CLASS_WORDS), text
                assert not any(c.rstrip(".") in low for c in class_texts), text
    assert len(seen) > 500  # several phrasings, not one template per class
    vocabulary = " ".join(captions.vocabulary_texts()).lower()
    assert not any(w in vocabulary for w in CLASS_WORDS)


def test_captions_say_what_was_drawn():
    for rng, drawn in _drawn_clips():
        plan = drawn.plan
        for t in range(len(drawn.frames)):
            text = captions.context_caption(rng, drawn, t)
            if plan["phone"] == "hand":
                assert any(p in text for p in captions.HANDS["phone"]), text
            assert any(p in text for p in captions.OBJECTS[drawn.desk_object]), text
            face = captions.face_caption(rng, drawn, t)
            # at least three of the five face attributes are named, each by a phrasing of the
            # value drawn in this frame
            named = sum(
                any(p in face for p in table[value])
                for table, value in (
                    (captions.MOUTH, plan["mouth"][t]),
                    (captions.EYES, plan["eye"][t]),
                    (captions.BROWS, plan["brow"][t]),
                    (captions.GAZE, captions._gaze(plan, t)),
                    (captions.HEAD, captions._head(plan, t)),
                )
            )
            assert named >= 3, face


def test_tokenizer_knows_class_texts_and_fits_the_tiny_vocabulary():
    tok = tokenizer_lib.offline_tokenizer(captions.vocabulary_texts())
    assert (
        len(tok) == tokenizer_lib.VOCAB_BUDGET == pretrain_tiny.get_config().model.clip.vocab_size
    )
    for text in tokenizer_lib.corpus_texts():
        for word in tokenizer_lib._PATTERN.findall(text.lower()):
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    # caption words are known: far fewer pieces than bytes
    ids = tok("yawning widely, drooping eyelids", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8


def test_pretraining_clips_are_not_the_demo_clips(tmp_path):
    synthetic.generate(tmp_path / "raer", 10, 0, workers=1, min_frames=4, max_frames=4)
    from PIL import Image

    demo = np.asarray(Image.open(tmp_path / "raer" / "clips" / "0001" / "000001.jpg"))
    rng = np.random.default_rng([0, pretrain_data.PRETRAIN_STREAM, 0])
    drawn = synthetic.draw_clip(rng, 0, 4, 160, 120)
    assert np.abs(np.asarray(drawn.frames[0], float) - demo).mean() > 10


def _config(tmp_path, **overrides) -> ml_collections.ConfigDict:
    c = pretrain_tiny.get_config()
    c.data.dir = str(tmp_path / "pairs")
    c.data.num_clips = 6
    c.data.frames_per_clip = 3
    c.data.captions_per_frame = 2
    c.data.draw_workers = 0
    c.train.batch_size = 8
    c.train.num_steps = 4
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.optim.warmup_steps = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of four steps (checkpoints at 2 and 4) and its exported folder."""
    tmp = tmp_path_factory.mktemp("pretrain")
    config = _config(tmp)
    result = pretrain.pretrain(config, tmp / "work")
    return config, tmp, result


@pytest.mark.slow  # pretraining runs
def test_a_few_steps_export_a_folder_reused_while_config_and_data_agree(four_steps):
    config, tmp, result = four_steps
    folder = result["export"]
    assert not result["reused"]
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (folder / name).is_file(), name
    assert (tmp / "work" / "curves.png").is_file()
    again = pretrain.pretrain(config, tmp / "work")
    assert again["reused"] and again["fingerprint"] == result["fingerprint"]
    changed = config.copy_and_resolve_references()
    changed.data.captions_per_frame = 3
    data_fp = pretrain_data.fingerprint(changed.data, tmp / "work" / pretrain.TOKENIZER_DIR)
    assert pretrain.run_fingerprint(changed, data_fp) != result["fingerprint"]


@pytest.mark.slow  # pretraining runs
def test_resume_gives_the_same_weights(four_steps, tmp_path):
    config, tmp, result = four_steps
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work)
    shutil.rmtree(work / "checkpoints" / "4")
    shutil.rmtree(work / pretrain.EXPORT_DIR)
    resumed = pretrain.pretrain(config, work)
    assert not resumed["reused"]
    a, _ = clip_weights.load_clip_weights(result["export"])
    b, _ = clip_weights.load_clip_weights(resumed["export"])
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # pretraining runs
def test_another_config_sets_old_checkpoints_aside_and_never_resumes_them(four_steps, tmp_path):
    config, tmp, result = four_steps
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work)
    shutil.rmtree(work / pretrain.EXPORT_DIR)
    changed = config.copy_and_resolve_references()
    changed.optim.lr = 1e-4
    data_fp = pretrain_data.fingerprint(changed.data, work / pretrain.TOKENIZER_DIR)
    new = pretrain.run_fingerprint(changed, data_fp)
    assert new != result["fingerprint"]
    checkpoint.set_aside_other_run(work, new)  # what pretrain() does first
    assert (work / f"checkpoints.{result['fingerprint']}" / "4").is_dir()
    assert not (work / "checkpoints").exists()
    # checkpoints copied in from another run are refused, not resumed from
    shutil.copytree(tmp / "work" / "checkpoints", work / "checkpoints")
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="another config or data"):
        pretrain.pretrain(changed, work)


@pytest.mark.slow  # pretraining runs
def test_export_loads_as_a_clip_source_and_in_transformers_with_the_same_embeddings(tmp_path):
    """The exported folder, read by our loader (config.model.clip.source) and by transformers'
    CLIPModel, on [0, 1] pixels gives the embeddings of the weights it was written from on
    CLIP-normalised pixels (the fold), within 1e-5; the tokenizer read back gives the same ids."""
    import torch
    from transformers import CLIPModel

    geometry = clip.CLIPGeometry.from_config(pretrain_tiny.get_config().model.clip)
    model = clip.CLIP(geometry)
    pixels = np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    tokenizer_lib.write_offline_vocab(tmp_path / "tokenizer", captions.vocabulary_texts())
    tok = tokenizer_lib.offline_tokenizer(captions.vocabulary_texts())
    ids = tokenizer_lib.tokenize(tok, list(prompts.TEXT_TYPES["class_descriptor"]), 77)
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    params = jax.device_get(jax.jit(model.init)(jax.random.key(1), pixels, ids)["params"])
    want_image, want_text = apply(params, caer.encoder_input(jnp.asarray(pixels), "clip"), ids)
    folder = export.write_folder(
        tmp_path / "clip",
        params,
        geometry,
        tokenizer_dir=tmp_path / "tokenizer",
        pixel_normalization="clip",
        logit_scale=20.0,
        fingerprint="test",
    )
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (folder / name).is_file(), name

    source = ml_collections.ConfigDict({"source": str(folder), "vocab_size": geometry.vocab_size})
    np.testing.assert_array_equal(
        tokenizer_lib.tokenize(
            tokenizer_lib.load_tokenizer(source), list(prompts.TEXT_TYPES["class_descriptor"]), 77
        ),
        ids,
    )
    ours_image, ours_text = apply(clip_weights.load_clip_params(folder, geometry), pixels, ids)
    hf = CLIPModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        hf_text = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
    hf_image = getattr(hf_image, "pooler_output", hf_image).numpy()
    hf_text = getattr(hf_text, "pooler_output", hf_text).numpy()
    for got in (ours_image, hf_image):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_image), atol=1e-5)
    for got in (ours_text, hf_text):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_text), atol=1e-5)
    assert export.read_fingerprint(folder) == "test"


def test_folding_the_pixel_normalisation_is_exact():
    geometry = clip.CLIPGeometry.from_config(pretrain_tiny.get_config().model.clip)
    model = clip.CLIP(geometry)
    pixels = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    ids = np.zeros((2, 77), np.int32)
    params = jax.jit(model.init)(jax.random.key(0), pixels, ids)["params"]
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))
    want = encode(params, caer.encoder_input(jnp.asarray(pixels), "clip"))
    folded = export.fold_pixel_normalization(
        jax.device_get(params), caer.CLIP_PIXEL_MEAN, caer.CLIP_PIXEL_STD
    )
    got = encode(folded, pixels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_config_values_are_in_range():
    # (The embedded default takes its CLIP geometry from this config: they agree by construction.)
    from caer_jax import config_check

    config_check.check(pretrain_tiny.get_config())


def test_contrastive_loss_is_low_for_matching_pairs():
    x = jnp.eye(4, 8)
    low, acc = contrastive.contrastive_loss(x, x, jnp.float32(100.0))
    high, _ = contrastive.contrastive_loss(x, x[::-1], jnp.float32(100.0))
    assert float(low) < 1e-3 and float(acc) == 1.0 and float(high) > 10


@pytest.mark.slow  # pretraining runs
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.num_clips": 0}, "config.data.num_clips=0 (expected >= 1)"),
        ({"data.text_length": 5}, "config.data.text_length=5"),
        ({"train.batch_size": 512}, "fewer than one batch (config.train.batch_size=512)"),
        ({"model.pixel_normalization": "imagenet"}, "config.model.pixel_normalization='imagenet'"),
    ],
)
def test_bad_settings_are_named(four_steps, tmp_path, overrides, message):
    config = _config(tmp_path, **overrides)
    if "train.batch_size" in overrides:
        config.data.dir = four_steps[0].data.dir  # the module's pairs, reused (same fingerprint)
    with pytest.raises(errors.BadInputError, match=re.escape(message)):
        pretrain.pretrain(config, tmp_path / "work")


@pytest.mark.slow  # the command in its own process
def test_command_line_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "caer_jax.pretrain",
            "--config=configs/pretrain_tiny.py",
            f"--workdir={tmp_path}",
            "--config.train.num_steps=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: config.train.num_steps=0 (expected >= 1)"], proc.stderr
