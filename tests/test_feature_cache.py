"""The frozen-encoder feature cache: same batches, logits and gradients as the pixel path;
sharded and resumed builds; stale caches and uncacheable configs refused.

Uses the TFDS fixture of test_pipeline (frame t has red value 8 t, and a blue ramp across its
width that a flip reverses) at 16 px.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pipeline import SIZE, TEST_FRAMES

from caer_jax import optim, steps
from caer_jax import state as state_lib
from caer_jax.data import feature_cache, pipeline
from caer_jax.models import caer
from configs import synthetic_tiny


def _config(data_dir, cache_dir, **data):
    c = synthetic_tiny.get_config("scratch,feature_cache")
    c.data.tfds_name = "raer_pipeline_fixture"
    c.data.data_dir = str(data_dir)
    c.data.image_size = SIZE
    c.data.num_segments = 4
    c.data.worker_count = 0
    c.data.feature_cache.dir = str(cache_dir)
    c.data.feature_cache.clips_per_chunk = 3
    c.data.feature_cache.frames_per_batch = 16
    c.train.batch_size = 4
    c.train.eval_batch_size = 4
    c.model.clip.image_size = SIZE
    c.model.clip.patch_size = 8
    c.model.clip.vision_layers = 1
    c.model.clip.text_layers = 1
    c.model.clip.context_length = 40
    for key, value in data.items():
        c.data[key] = value
    return c


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    """A config, its model and parameters, and the caches of train and test built with them."""
    config = _config(data_dir, tmp_path_factory.mktemp("cache"))
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    params = caer.init_params(model, config.model, jax.random.key(0))
    for split in ("train", "test"):
        feature_cache.build(config, model, params, split, process_index=0, process_count=1)
    return config, model, params


def _pixel_config(config):
    c = config.copy_and_resolve_references()
    c.data.feature_cache.enabled = False
    return c


def _split_records(directory):
    """Every view's records of a built split, as raw bytes, with the chunk markers."""
    info = json.loads((directory / feature_cache.INFO_FILE).read_text())
    source = feature_cache.FeatureSource(directory, info["key"])
    records = [source[i] for i in range(len(source))]
    return info, records


def test_uncacheable_configs_are_refused(data_dir, tmp_path):
    config = _config(data_dir, tmp_path)
    config.data.rotation_degrees = 4.0
    with pytest.raises(ValueError, match="rotation_degrees=4.0.*cannot be cached"):
        feature_cache.check_config(config)
    config = _config(data_dir, tmp_path)
    config.model.freeze_image_encoder = False
    with pytest.raises(ValueError, match="needs config.model.freeze_image_encoder=True"):
        feature_cache.check_config(config)
    config = _config(data_dir, tmp_path)
    config.data.feature_cache.flipped = False
    with pytest.raises(ValueError, match="flip_prob=0.5 needs flipped features"):
        feature_cache.check_config(config)


def test_cache_holds_the_encoder_features_of_every_stored_frame(built):
    config, model, params = built
    directory = feature_cache.split_dir(
        config, "test", feature_cache.params_sha256(params["image_encoder"])
    )
    info, records = _split_records(directory)
    assert info["num_chunks"] == 3  # 7 clips by 3
    source = pipeline.clip_source(config, "test")
    lengths = [source[i].num_frames for i in range(len(source))]
    assert sorted(lengths) == sorted(TEST_FRAMES)
    assert [len(r["face"]) for r in records] == lengths  # in the data source's order
    loader = pipeline.ClipLoader.from_config(config)
    indices = (0, 3, 6)
    # Every frame of the three clips in one [2 (face, context), frames, ...] batch: the encoder
    # embeds each frame on its own, and one shape is one compiled program.
    every = [
        pipeline.ClipLoader(lengths[i], 1, SIZE, 0.0, 0.0).load(source[i], i, None) for i in indices
    ]
    pixels = np.stack([np.concatenate([e[view] for e in every]) for view in ("face", "context")])
    encode = jax.jit(functools.partial(model.apply, method="encode_frames"))
    starts = np.cumsum([lengths[i] for i in indices])[:-1]
    plain = np.split(np.asarray(encode({"params": params}, pixels)), starts, axis=1)
    mirrored = np.split(np.asarray(encode({"params": params}, pixels[:, :, :, ::-1])), starts, 1)
    for index, want, flipped in zip(indices, plain, mirrored, strict=True):
        clip = loader.load(source[index], index, None)  # eval: no flip, resize only
        np.testing.assert_allclose(records[index]["face"], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(records[index]["context"], want[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(records[index]["face_flipped"], flipped[0], rtol=1e-5, atol=1e-5)
        # The fixture's frames are not mirror images of themselves: flips are seen.
        assert np.abs(records[index]["face_flipped"] - records[index]["face"]).max() > 1e-2
        assert clip["label"] == records[index]["label"]


def _loss_and_grads(model, params, batch, method):
    def loss(p, inputs):
        face, context = steps.stream_inputs(inputs, "both")
        logits, _ = model.apply(
            {"params": p},
            face,
            context,
            train=True,
            rngs={"dropout": jax.random.key(7)},
            method=method,
        )
        return steps.cross_entropy(logits, inputs["label"]), logits

    # The batch is an argument, not a constant of the program: one compile serves every batch.
    inputs = {key: batch[key] for key in ("face", "context", "label")}
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, inputs)


def test_cached_path_gives_the_pixel_paths_batches_logits_and_gradients(built):
    config, model, params = built
    pixel_config = _pixel_config(config)
    args = dict(seed=3, process_index=0, process_count=1, start_step=1)
    cached = feature_cache.train_iterator(config, params, **args)
    pixels = feature_cache.train_iterator(pixel_config, params, **args)
    for _ in range(3):  # crosses an epoch boundary (2 steps per epoch)
        a, b = next(cached), next(pixels)
        for key in ("label", "mask", "index"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["face"].shape == (4, 4, model.geometry.embed_dim)
        (loss_a, logits_a), grads_a = _loss_and_grads(model, params, a, "from_features")
        (loss_b, logits_b), grads_b = _loss_and_grads(model, params, b, None)
        np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
        flat_a = jax.tree_util.tree_flatten_with_path(grads_a)[0]
        groups = jax.tree.leaves(optim.param_groups(params, freeze_image_encoder=True))
        for (path, ga), gb, group in zip(flat_a, jax.tree.leaves(grads_b), groups, strict=True):
            if path[0].key == "image_encoder":  # no gradient reaches it on either path
                assert not np.any(ga) and not np.any(gb)
            elif group != optim.FROZEN:  # the trained parameters
                # fp32 round-off of features encoded in other batches, relative to the leaf
                scale = np.abs(gb).max()
                np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))
    cached.close()
    pixels.close()


def test_eval_batches_from_the_cache_match_the_pixel_path(built):
    config, model, params = built
    args = dict(process_index=1, process_count=2)
    cached = list(feature_cache.eval_batches(config, "test", params, **args))
    pixels = list(feature_cache.eval_batches(_pixel_config(config), "test", params, **args))
    assert len(cached) == len(pixels) == 2
    apply = jax.jit(model.apply, static_argnames="method")
    for a, b in zip(cached, pixels, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        logits_a, _ = apply({"params": params}, a["face"], a["context"], method="from_features")
        logits_b, _ = apply({"params": params}, b["face"], b["context"])
        keep = a["mask"]
        np.testing.assert_allclose(logits_a[keep], logits_b[keep], rtol=1e-5, atol=1e-5)


def test_a_build_shared_by_processes_and_resumed_equals_one_build(built, tmp_path):
    config, model, params = built
    sha = feature_cache.params_sha256(params["image_encoder"])
    _, whole = _split_records(feature_cache.split_dir(config, "train", sha))
    config = config.copy_and_resolve_references()
    config.data.feature_cache.dir = str(tmp_path)
    directory = feature_cache.split_dir(config, "train", sha)
    # Process 1 of 2 first (it writes no cache_info), then process 0, which completes it.
    for p in (1, 0):
        if p == 0:
            assert not (directory / feature_cache.INFO_FILE).exists()
        feature_cache.build(config, model, params, "train", process_index=p, process_count=2)
    # An interrupted rebuild: chunk 1 lost its marker and cache_info was never written.
    (directory / "chunk-00001.json").unlink()
    (directory / feature_cache.INFO_FILE).unlink()
    kept = (directory / "chunk-00002.face.array_record").stat().st_mtime_ns
    feature_cache.build(config, model, params, "train", process_index=0, process_count=1)
    assert (directory / "chunk-00002.face.array_record").stat().st_mtime_ns == kept
    assert (directory / "chunk-00001.json").exists()
    _, rebuilt = _split_records(directory)
    assert len(rebuilt) == len(whole) == 11
    for a, b in zip(rebuilt, whole, strict=True):
        for view in feature_cache.views(True):
            np.testing.assert_array_equal(a[view], b[view])
        assert (a["label"], a["video_id"]) == (b["label"], b["video_id"])


def test_a_stale_cache_is_refused_naming_what_changed(built):
    config, model, params = built
    other = caer.init_params(model, config.model, jax.random.key(1))
    with pytest.raises(ValueError, match=r"stale.*encoder\.params_sha256"):
        feature_cache.train_iterator(config, other, seed=0, process_index=0, process_count=1)
    changed = config.copy_and_resolve_references()
    changed.model.pixel_normalization = "none"
    with pytest.raises(
        ValueError, match="encoder.pixel_normalization: 'clip' in the cache, 'none'"
    ):
        feature_cache.build(changed, model, params, "test", process_index=0, process_count=1)
    changed = config.copy_and_resolve_references()
    changed.data.flip_prob = 0.0
    changed.data.feature_cache.flipped = False
    with pytest.raises(ValueError, match="flipped: True in the cache, False now"):
        feature_cache.open_split(changed, "test", params)


def test_frozen_encoder_gets_no_update_and_no_optimizer_state(built):
    config, model, params = built
    tx = optim.make_optimizer(params, config.optim, 10, freeze_image_encoder=True)
    state = state_lib.create(params, tx)
    held = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    ]
    assert not [p for p in held if "'image_encoder'" in p]
    assert [p for p in held if "'temporal_face'" in p]
    s = config.data.num_segments
    batch = {
        "face": jnp.full((2, s, SIZE, SIZE, 3), 100, jnp.uint8),
        "context": jnp.full((2, s, SIZE, SIZE, 3), 30, jnp.uint8),
        "label": jnp.array([0, 1]),
    }
    step = jax.jit(
        lambda st, b: steps.train_step(
            st, b, model=model, tx=tx, dropout_rng=jax.random.key(0), streams="both"
        )
    )
    new, _ = step(state, batch)
    same = jax.tree.map(np.array_equal, new.params["image_encoder"], params["image_encoder"])
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(
        new.params["temporal_face"]["cls_token"], params["temporal_face"]["cls_token"]
    )


@pytest.mark.slow  # two training runs
def test_training_from_the_cache_equals_training_on_pixels_with_a_frozen_encoder(tmp_path):
    """train_and_evaluate end to end, 8 devices: the same losses, selection and test predictions,
    and the frozen encoder is the one in the checkpoint."""
    import csv

    import tiny_runs

    from caer_jax import checkpoint, trainer

    settings = tiny_runs.overrides(tmp_path, num_clips=24)
    runs = {}
    for enabled in (False, True):
        config = tiny_runs.config(settings, "feature_cache")
        config.data.feature_cache.enabled = enabled
        workdir = tmp_path / f"cache_{enabled}"
        summary = trainer.train_and_evaluate(config, workdir)
        ckpts = checkpoint.Checkpoints(workdir, read_only=True)
        meta = ckpts.read_meta(ckpts.manager.latest_step())
        ckpts.close()
        with open(workdir / "predictions.csv") as f:
            rows = list(csv.reader(f))[1:]
        runs[enabled] = (summary, meta["history"], rows)
    (pixels, pixel_history, pixel_rows), (cached, cache_history, cache_rows) = runs.values()
    assert cached["uar"] == pixels["uar"] and cached["war"] == pixels["war"]
    for a, b in zip(cache_history, pixel_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["uar"] == b["uar"]
    assert [r[:3] for r in cache_rows] == [r[:3] for r in pixel_rows]
    probs = lambda rows: np.array([[float(x) for x in r[3:]] for r in rows])  # noqa: E731
    np.testing.assert_allclose(probs(cache_rows), probs(pixel_rows), atol=1e-3)
    groups = (tmp_path / "cache_True" / "param_groups.txt").read_text()
    assert "image_encoder/conv1/kernel" in groups
    assert all("group=frozen" in line for line in groups.splitlines() if "image_encoder" in line)
