"""Augmentation and the grain input pipeline, on a tiny TFDS dataset built here.

The fixture dataset has the features of the RAER builder; frame t of a clip has red value 8 * t
everywhere, so the frames a batch holds can be read back off its pixels, and a blue ramp across
its width, so that a horizontal flip changes it.
Needs the 8 fake CPU devices that tests/conftest.py sets up (for global_batch).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P
from PIL import Image

from caer_jax import sharding
from caer_jax.data import augment, pipeline, sampling
from caer_jax.prompts import CLASS_NAMES
from configs import synthetic_tiny
from tfds_raer.raer import frame_records

SIZE = 16
TRAIN_FRAMES = [1, 3, 8, 9, 17, 30, 5, 12, 4, 20, 2]  # 11 clips: 2 batches of 4, 3 dropped
TEST_FRAMES = [1, 7, 16, 25, 4, 9, 30]  # 7 clips: 2 global batches of 4, one padding row


def _frames(num_frames: int, record: int, stream_value: int) -> np.ndarray:
    frames = np.empty((num_frames, SIZE, SIZE, 3), np.uint8)
    frames[..., 0] = (8 * np.arange(num_frames))[:, None, None]
    frames[..., 1] = 10 * record
    frames[..., 2] = stream_value + 3 * np.arange(SIZE)  # left to right: a flip reverses it
    return frames


class RaerPipelineFixture(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The RAER builder's record layout (tfds_raer/raer/frame_records.py) on a few small clips."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=frame_records.features((SIZE, SIZE, 3), (SIZE, SIZE, 3), "jpeg", CLASS_NAMES),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples("train", TRAIN_FRAMES),
            "test": self._generate_examples("test", TEST_FRAMES),
        }

    def _generate_examples(self, split, lengths):
        clips = [
            {
                "video_id": f"{split}/clip{i:02d}",
                "label": i % len(CLASS_NAMES),
                "face": list(_frames(n, i, 50)),
                "context": list(_frames(n, i, 200)),
                "face_box_found": [True] * n,
                "annotation": f"{split}.txt:{i + 1}",
            }
            for i, n in enumerate(lengths)
        ]
        table = frame_records.ClipTable.of_clips(
            (c["video_id"], c["label"], len(c["face"])) for c in clips
        )
        self.info.metadata.setdefault(frame_records.METADATA_KEY, {})[split] = table.to_json()
        for position, clip in enumerate(clips):
            yield from frame_records.frame_examples(position, len(clips), clip)


@pytest.fixture(scope="module")
def records(data_dir):
    """Per split: clip index -> (num_frames, label, video_id) as the clip source orders them,
    read off the frame records themselves."""
    out = {}
    for split in ("train", "test"):
        frames = tfds.data_source("raer_pipeline_fixture", split=split, data_dir=str(data_dir))
        starts = [r for r in frames if r["frame_index"] == 0]
        out[split] = [
            (int(r["num_frames"]), int(r["label"]), r["video_id"].decode()) for r in starts
        ]
    return out


def _config(data_dir, **data):
    c = synthetic_tiny.get_config("scratch")
    c.data.tfds_name = "raer_pipeline_fixture"
    c.data.data_dir = str(data_dir)
    c.data.image_size = SIZE
    c.data.num_segments = 4
    c.data.worker_count = 0
    c.train.batch_size = 4
    c.train.eval_batch_size = 4
    for key, value in data.items():
        c.data[key] = value
    return c


def _frames_seen(clips: np.ndarray) -> np.ndarray:
    """[B, T, S, S, 3] of fixture frames -> the frame index of each [B, T] (centre pixel)."""
    return np.rint(clips[:, :, SIZE // 2, SIZE // 2, 0] / 8).astype(int)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------- augmentation


def _pattern(t: int = 3, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)


def test_identity_draw_is_scaling_only():
    x = _pattern()
    out = augment.transform_frames(list(x), 8)
    assert out.dtype == np.float32 and out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out, x.astype(np.float32) / 255)
    np.testing.assert_array_equal(augment.transform_frames(list(x), 8, augment.Draw(0.0)), out)


def test_flip_flips_width():
    x = _pattern()
    out = augment.transform_frames(list(x), 8, augment.Draw(angle=0.0, flip=True))
    np.testing.assert_array_equal(out, x[:, :, ::-1].astype(np.float32) / 255)


def test_rotation_is_counter_clockwise_with_black_fill():
    x = _pattern()
    out = augment.transform_frames(list(x), 8, augment.Draw(angle=90.0))
    np.testing.assert_array_equal(out, np.rot90(x, k=1, axes=(1, 2)).astype(np.float32) / 255)
    white = np.full((1, 32, 32, 3), 255, np.uint8)
    out = augment.transform_frames(list(white), 32, augment.Draw(angle=4.0))
    assert np.all(out[0, 0, -1] == 0) and np.all(out[0, -1, 0] == 0)  # corners filled black
    assert np.all(out[0, 8:24, 8:24] == 1)


def test_resize_is_pil_bilinear_aspect_not_kept():
    x = np.random.default_rng(1).integers(0, 256, (2, 20, 12, 3), dtype=np.uint8)
    out = augment.transform_frames(list(x), 8)
    expected = np.asarray(Image.fromarray(x[1]).resize((8, 8), Image.Resampling.BILINEAR))
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(out[1], expected.astype(np.float32) / 255)


def test_one_draw_for_all_frames_of_a_stream():
    frame = _pattern(1, 16)[0]
    draw = augment.random_draw(np.random.default_rng(3), rotation_degrees=4.0, flip_prob=0.5)
    out = augment.transform_frames([frame] * 5, 16, draw)
    for t in range(1, 5):
        np.testing.assert_array_equal(out[t], out[0])


def test_random_draw_range_and_seed():
    draws = [augment.random_draw(np.random.default_rng(s), 4.0, 0.5) for s in range(400)]
    angles = np.array([d.angle for d in draws])
    assert angles.min() >= -4 and angles.max() <= 4 and angles.min() < -3 and angles.max() > 3
    assert 150 < sum(d.flip for d in draws) < 250
    assert augment.random_draw(np.random.default_rng(9), 4.0, 0.5) == draws[9]
    assert not augment.random_draw(np.random.default_rng(0), 4.0, 0.0).flip


# ---------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_every_clip_exactly_once(data_dir, records, process_count):
    config = _config(data_dir)
    per_process = [
        list(pipeline.eval_batches(config, "test", process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert len({len(b) for b in per_process}) == 1  # same number of steps on every process
    assert len(per_process[0]) == 2  # ceil(7 / 4)
    seen = []
    for batches in per_process:
        for batch in batches:
            assert batch["face"].shape == (4 // process_count, 4, SIZE, SIZE, 3)
            # uint8 pixels: the jitted step scales them on the device
            assert batch["face"].dtype == np.uint8 and batch["context"].dtype == np.uint8
            assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
            assert batch["mask"].dtype == np.bool_
            np.testing.assert_array_equal(batch["index"][~batch["mask"]], pipeline.PAD_INDEX)
            assert np.all(batch["face"][~batch["mask"]] == 0)
            for row in np.flatnonzero(batch["mask"]):
                index = int(batch["index"][row])
                num_frames, label, _ = records["test"][index]
                assert batch["label"][row] == label
                expected = sampling.eval_indices(num_frames, 4, 1)
                np.testing.assert_array_equal(
                    _frames_seen(batch["face"][row : row + 1])[0], expected
                )
                np.testing.assert_array_equal(
                    _frames_seen(batch["context"][row : row + 1])[0], expected
                )
                seen.append(index)
    assert sorted(seen) == list(range(len(TEST_FRAMES)))
    assert sum(int((~b["mask"]).sum()) for batches in per_process for b in batches) == 1


def test_video_ids_by_record_index(data_dir, records):
    assert pipeline.video_ids(_config(data_dir), "test") == [r[2] for r in records["test"]]


# ---------------------------------------------------------------------------- train


def test_train_epochs_cover_clips_once_and_drop_remainder(data_dir, records):
    config = _config(data_dir)
    assert pipeline.steps_per_epoch(config) == 2  # 11 // 4
    it = pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)
    epochs = [_take(it, 2) for _ in range(3)]
    orders = []
    for batches in epochs:
        index = np.concatenate([b["index"] for b in batches])
        assert len(set(index.tolist())) == 8  # 8 distinct clips, 3 dropped this epoch
        orders.append(index.tolist())
        for batch in batches:
            assert batch["face"].shape == (4, 4, SIZE, SIZE, 3)
            assert batch["mask"].all()
            assert batch["context"].dtype == np.uint8
            labels = [records["train"][i][1] for i in batch["index"]]
            np.testing.assert_array_equal(batch["label"], labels)
    assert orders[0] != orders[1] and orders[1] != orders[2]  # reshuffled every epoch


def test_train_frames_are_tsn_draws_shared_by_both_streams(data_dir, records):
    config = _config(data_dir)
    it = pipeline.train_iterator(config, seed=1, process_index=0, process_count=1)
    for batch in _take(it, 6):
        face, context = _frames_seen(batch["face"]), _frames_seen(batch["context"])
        np.testing.assert_array_equal(face, context)
        for row, index in enumerate(batch["index"]):
            n = records["train"][index][0]
            avg = n // 4
            if avg > 0:
                starts = np.arange(4) * avg
                assert np.all(face[row] >= starts) and np.all(face[row] < starts + avg)
            else:
                np.testing.assert_array_equal(face[row], np.minimum(np.arange(4), n - 1))


def test_train_hosts_split_the_global_batch(data_dir):
    config = _config(data_dir)
    whole = _take(pipeline.train_iterator(config, seed=5, process_index=0, process_count=1), 4)
    parts = [
        _take(pipeline.train_iterator(config, seed=5, process_index=p, process_count=2), 4)
        for p in range(2)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_train_deterministic_for_a_seed(data_dir):
    config = _config(data_dir)
    a = _take(pipeline.train_iterator(config, seed=3, process_index=0, process_count=1), 3)
    b = _take(pipeline.train_iterator(config, seed=3, process_index=0, process_count=1), 3)
    _assert_batches_equal(a, b)
    c = _take(pipeline.train_iterator(config, seed=4, process_index=0, process_count=1), 3)
    assert any(not np.array_equal(x["face"], y["face"]) for x, y in zip(a, c, strict=True))


def test_train_state_restore_resumes_exactly(data_dir):
    # In an iterator made with the same arguments, here one that started mid-epoch.
    config = _config(data_dir)
    it = pipeline.train_iterator(config, seed=2, process_index=0, process_count=1, start_step=1)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)  # crosses the epoch boundary
    fresh = pipeline.train_iterator(config, seed=2, process_index=0, process_count=1, start_step=1)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


@pytest.mark.parametrize("start_step", [1, 2, 3])
def test_train_start_step_gives_the_same_global_batches_on_any_process_count(data_dir, start_step):
    # Mid-epoch (odd) and epoch-boundary (even) starts, as a resume on another topology makes.
    config = _config(data_dir)
    assert pipeline.steps_per_epoch(config) == 2
    whole = _take(
        pipeline.train_iterator(config, seed=2, process_index=0, process_count=1), start_step + 2
    )[start_step:]
    later = pipeline.train_iterator(
        config, seed=2, process_index=0, process_count=1, start_step=start_step
    )
    _assert_batches_equal(_take(later, 2), whole)
    parts = [
        _take(
            pipeline.train_iterator(
                config, seed=2, process_index=p, process_count=2, start_step=start_step
            ),
            2,
        )
        for p in range(2)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_worker_processes_give_the_same_batches_and_state(data_dir):
    reference = _take(
        pipeline.train_iterator(_config(data_dir), seed=0, process_index=0, process_count=1), 4
    )
    config = _config(data_dir, worker_count=2)
    it = pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)
    try:
        _assert_batches_equal(_take(it, 2), reference[:2])
        state = it.get_state()
    finally:
        it.close()
    resumed = pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)
    try:
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 2), reference[2:])
    finally:
        resumed.close()


def test_worker_processes_never_start_a_jax_backend(data_dir, monkeypatch):
    # On a GPU host a worker that touched JAX would take accelerator memory for itself (75 % of
    # the GPU, preallocated per process). Workers inherit this environment, in which starting
    # any JAX backend fails; this process's backend is up already.
    assert jax.devices()
    monkeypatch.setenv("JAX_PLATFORMS", "no_such_platform")
    it = pipeline.train_iterator(
        _config(data_dir, worker_count=1), seed=0, process_index=0, process_count=1
    )
    try:
        assert next(it)["face"].shape == (4, 4, SIZE, SIZE, 3)
    finally:
        it.close()


def test_batch_not_divisible_by_processes(data_dir):
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
        pipeline.train_iterator(_config(data_dir), seed=0, process_index=0, process_count=3)


def test_resize_when_stored_size_differs(data_dir):
    config = _config(data_dir, image_size=8)
    batch = next(pipeline.eval_batches(config, "test", process_index=0, process_count=1))
    assert batch["face"].shape == (4, 4, 8, 8, 3) and batch["context"].shape == (4, 4, 8, 8, 3)


# ---------------------------------------------------------------------------- global batch


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_global_batch_on_eight_devices(data_dir, data, fsdp):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = _config(data_dir)
    config.train.eval_batch_size = 8
    config.mesh.data, config.mesh.fsdp = data, fsdp
    mesh = sharding.make_mesh(config.mesh)
    host = next(pipeline.eval_batches(config, "test", process_index=0, process_count=1))
    batch = pipeline.global_batch(host, mesh)
    assert batch.keys() == host.keys()
    for key, value in batch.items():
        assert isinstance(value, jax.Array) and value.shape == host[key].shape
        assert value.dtype == host[key].dtype
        assert value.sharding.spec == P(("data", "fsdp"))
        assert len(value.addressable_shards) == 8
        assert value.addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(value), host[key])


# ---------------------------------------------------------------------------- the RAER builder


def test_on_the_raer_builder(tmp_path):
    """The pipeline on raer/64px built from the builder's dummy_data (4 train, 2 test clips)."""
    from tfds_raer.raer.raer_dataset_builder import Builder

    manual = Path(Builder.code_path).parent / "dummy_data"
    data_dir = tmp_path / "tfds"
    tfds.builder("raer/64px", data_dir=str(data_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    config = _config(data_dir, tfds_name="raer/64px", image_size=64)
    config.train.batch_size = config.train.eval_batch_size = 2
    expected = {}
    for line in (manual / "test.txt").read_text().splitlines():
        frames_dir, _, label = line.split()
        expected[frames_dir] = int(label) - 1
    ids = pipeline.video_ids(config, "test")
    assert sorted(ids) == sorted(expected)
    labels = {}
    for batch in pipeline.eval_batches(config, "test", process_index=0, process_count=1):
        assert batch["face"].shape == (2, 4, 64, 64, 3) and batch["mask"].all()
        for index, label in zip(batch["index"], batch["label"], strict=True):
            labels[ids[index]] = int(label)
    assert labels == expected
    assert pipeline.steps_per_epoch(config) == 2
    batch = next(pipeline.train_iterator(config, seed=0, process_index=0, process_count=1))
    assert batch["context"].shape == (2, 4, 64, 64, 3) and batch["context"].dtype == np.uint8


def test_iterator_state_through_orbax(data_dir, tmp_path):
    """What a checkpoint saves: the iterator itself through grain's orbax handler."""
    import grain
    import orbax.checkpoint as ocp

    config = _config(data_dir)
    it = pipeline.train_iterator(config, seed=7, process_index=0, process_count=1)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 2)
        fresh = pipeline.train_iterator(config, seed=7, process_index=0, process_count=1)
        restored = manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        ).data
    _assert_batches_equal(_take(restored, 2), expected)
