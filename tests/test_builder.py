"""The RAER TFDS builder: crops, ArrayRecord random access, options, and bad input."""

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_raer  # noqa: F401  (registers "raer")
from caer_jax import errors
from caer_jax.data import augment, clips, synthetic
from tfds_raer.raer import frame_records, raer_lib
from tfds_raer.raer.raer_dataset_builder import Builder

DUMMY = Path(Builder.code_path).parent / "dummy_data"
RaerFormatError = raer_lib.RaerFormatError


def build(manual_dir, data_dir, config="64px", **options):
    builder = tfds.builder(f"raer/{config}", data_dir=str(data_dir), **options)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def dummy_copy(tmp_path) -> Path:
    out = tmp_path / "manual"
    shutil.copytree(DUMMY, out)
    return out


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def frames_of(frames_dir: str) -> int:
    """Frames of a dummy_data clip."""
    return len(list((DUMMY / frames_dir).iterdir()))


SKIP = {stream: tfds.decode.SkipDecoding() for stream in clips.STREAMS}


def raw_records(data_dir, split: str, config: str = "64px"):
    """The frame records of `split`, crops left encoded."""
    return tfds.data_source(f"raer/{config}", split=split, data_dir=str(data_dir), decoders=SKIP)


def clip_source(data_dir, split: str, config: str = "64px") -> clips.ClipSource:
    return clips.ClipSource.open(f"raer/{config}", split, str(data_dir))


# ----------------------------------------------------------------------------- crops


def test_letterbox_geometry():
    img = Image.new("RGB", (30, 10), (255, 255, 255))
    out = np.asarray(raer_lib.letterbox(img, 16))
    rows = np.flatnonzero(out[:, :, 0].max(axis=1) > 0)
    # 10 * 16/30 = 5.33 -> 5 rows; 11 rows of padding: 5 on top, the odd one at the bottom
    assert rows.tolist() == [5, 6, 7, 8, 9]
    assert out.shape == (16, 16, 3) and out[:, :, 0].max(axis=0).min() > 0
    tall = np.asarray(raer_lib.letterbox(Image.new("RGB", (5, 20), (255, 0, 0)), 8))
    cols = np.flatnonzero(tall[:, :, 0].max(axis=0) > 0)
    assert cols.tolist() == [3, 4]  # 2 columns, 6 of padding: 3 left, 3 right
    # the scaled side is truncated: 13 * 16/30 = 6.93 -> 6 rows (round() would give 7), 5 + 5 pad
    short = np.asarray(raer_lib.letterbox(Image.new("RGB", (30, 13), (9, 9, 9)), 16))
    assert np.flatnonzero(short[:, 8, 0]).tolist() == [5, 6, 7, 8, 9, 10]
    with pytest.raises(raer_lib.BadClip, match="keeps no row"):
        raer_lib.letterbox(Image.new("RGB", (100, 1)), 16)


def test_face_region_margin_and_clamp():
    assert raer_lib.face_region([30, 40, 50, 60], 160, 120) == (10, 20, 70, 80)
    # the authors truncate each coordinate with int() before adding the margin
    assert raer_lib.face_region([30.9, 40.5, 50.7, 60.2], 160, 120) == (10, 20, 70, 80)
    assert raer_lib.face_region([5, 3, 150, 110], 160, 120) == (0, 0, 160, 120)
    assert raer_lib.face_region(None, 160, 120) == (0, 0, 160, 120)
    assert raer_lib.subsample(10, 4) == [1, 3, 6, 8]
    assert raer_lib.subsample(3, 4) == [0, 1, 2]


# ----------------------------------------------------------------------------- a built dataset


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    manual = root / "manual"
    synthetic.generate(
        manual, 12, seed=5, min_frames=3, max_frames=6, width=96, height=72, workers=1
    )
    build(manual, root / "tfds", "64px")
    return manual, root / "tfds"


def _annotations(manual: Path) -> dict[str, tuple[int, int]]:
    rows = {}
    for split in ("train", "test"):
        for line in (manual / f"{split}.txt").read_text().splitlines():
            d, n, label = line.split(" ")
            rows[d] = (int(n), int(label))
    return rows


def test_data_source_random_access_and_crop_pixels(synthetic_build):
    manual, data_dir = synthetic_build
    faces = json.loads((manual / "face_boxes.json").read_text())
    bodies = json.loads((manual / "body_boxes.json").read_text())
    rows = _annotations(manual)
    train_lines = (manual / "train.txt").read_text().splitlines()
    ds = tfds.data_source("raer/64px", split="train", data_dir=str(data_dir))
    assert type(ds).__name__ == "ArrayRecordDataSource"
    # one record per frame; the clips are those of train.txt
    assert len(ds) == sum(rows[line.split(" ")[0]][0] for line in train_lines)
    assert len(clip_source(data_dir, "train")) == len(train_lines)
    checked_missing, seen = 0, set()
    for i in reversed(range(len(ds))):  # random access, any order
        ex = ds[i]
        video_id, t = ex["video_id"].decode(), int(ex["frame_index"])
        n, label = rows[video_id]
        assert ex["label"] == label - 1 and ex["num_frames"] == n and 0 <= t < n
        assert ex["annotation"].decode().endswith(f"{video_id} {n} {label}")
        seen.add((video_id, t))
        face, context = ex["face"], np.asarray(ex["context"])
        assert context.shape == (64, 64, 3)
        name = sorted(p.name for p in (manual / video_id).iterdir())[t]
        assert ex["face_box_found"] == (name in faces[video_id])
        src = Image.open(manual / video_id / name).convert("RGB")
        box = faces[video_id].get(name)
        checked_missing += box is None
        want_face = np.asarray(raer_lib.crop_face(src, box), np.float32)
        want_ctx = np.asarray(raer_lib.crop_context(src, bodies.get(video_id), 64), np.float32)
        # independent of raer_lib: crop by hand for the face stream, kept at its source size
        if box is not None:
            left, u, r, b = (int(v) for v in box)
            region = (max(0, left - 20), max(0, u - 20), min(96, r + 20), min(72, b + 20))
        else:
            region = (0, 0, 96, 72)
        np.testing.assert_array_equal(want_face, np.asarray(src.crop(region), np.float32))
        for got, want in ((face, want_face), (context, want_ctx)):
            assert got.shape == want.shape and got.dtype == np.uint8
            # JPEG tolerance (these noisy frames lose ~3 levels on average at quality 95)
            diff = np.abs(got.astype(np.float32) - want)
            assert diff.mean() < 6.0 and np.percentile(diff, 99) < 50
            # and exactly what encoding the expected crop at the default quality gives
            jpeg = raer_lib.encode_image(
                Image.fromarray(want.astype(np.uint8)), "jpeg", 95, "4:4:4"
            )
            np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(jpeg))))
    # every frame of every train clip, once
    want = {(line.split(" ")[0], t) for line in train_lines for t in range(int(line.split(" ")[1]))}
    assert seen == want
    assert checked_missing > 0  # frames without a face box were among those checked


def test_raw_frame_records_hold_jpeg_bytes_and_clips_decode_to_the_same_pixels(synthetic_build):
    _, data_dir = synthetic_build
    ds = tfds.data_source("raer/64px", split="test", data_dir=str(data_dir))
    raw = raw_records(data_dir, "test")
    assert len(raw) == len(ds)
    for i in range(len(ds)):
        ex, ex_raw = ds[i], raw[i]
        for stream in clips.STREAMS:
            data = ex_raw[stream]
            assert isinstance(data, bytes) and data[:2] == b"\xff\xd8"
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), ex[stream])
    # the clip reader reads the same records, by clip, in any order (repeats allowed)
    source = clip_source(data_dir, "test")
    checked = 0
    for clip in reversed(source.clips):
        everything = clip.read_all()
        assert {k: len(v) for k, v in everything.items()} == dict.fromkeys(
            ("face", "context", "face_box_found"), clip.num_frames
        )
        for t in range(clip.num_frames):
            ex, ex_raw = ds[clip.first_record + t], raw[clip.first_record + t]
            assert ex["video_id"].decode() == clip.video_id and ex["frame_index"] == t
            assert everything["face_box_found"][t] == ex["face_box_found"]
            for stream in clips.STREAMS:
                assert everything[stream][t] == ex_raw[stream]
                np.testing.assert_array_equal(
                    np.asarray(augment.decode_image(everything[stream][t])), ex[stream]
                )
                checked += 1
        last = clip.num_frames - 1
        some = clip.read([last, 0, last])
        assert some["context"] == [everything["context"][t] for t in (last, 0, last)]
        with pytest.raises(IndexError):
            clip.read([clip.num_frames])
    assert checked == 2 * len(ds)


def test_records_in_clip_order_match_the_clip_table(synthetic_build):
    """Every split: a clip's frames are consecutive records, frame_index 0..n-1, the clips in the
    order of the metadata's clip table (that of the annotation file), and nothing else."""
    manual, data_dir = synthetic_build
    builder = tfds.builder("raer/64px", data_dir=str(data_dir))
    tables = builder.info.metadata[frame_records.METADATA_KEY]
    assert set(tables) == set(builder.info.splits) == {"train", "test"}
    for split in builder.info.splits:
        table = frame_records.ClipTable.from_json(tables[split])
        lines = [line.split(" ") for line in (manual / f"{split}.txt").read_text().splitlines()]
        assert list(table.video_ids) == [d for d, _, _ in lines]
        assert list(table.labels) == [int(y) - 1 for _, _, y in lines]
        assert list(table.num_frames) == [int(n) for _, n, _ in lines]
        records = raw_records(data_dir, split)
        assert table.total_frames == len(records) == builder.info.splits[split].num_examples
        columns = (table.video_ids, table.labels, table.num_frames)
        expected = [
            (video_id, label, n, t)
            for video_id, label, n in zip(*columns, strict=True)
            for t in range(n)
        ]
        got = [
            (r["video_id"].decode(), r["label"], r["num_frames"], r["frame_index"])
            for r in (records[i] for i in range(len(records)))
        ]
        assert got == expected
        source = clip_source(data_dir, split)
        assert source.video_ids == list(table.video_ids)
        assert [c.first_record for c in source] == table.first_frames.tolist()
        assert [(c.label, c.num_frames) for c in source] == list(zip(*columns[1:], strict=True))
    # split expressions count clips, not frame records
    half = len(tables["train"]["video_id"]) // 2
    mixed = clip_source(data_dir, f"train[:{half}]+test")
    assert mixed.video_ids == tables["train"]["video_id"][:half] + tables["test"]["video_id"]


def _damaged_copy(data_dir: Path, tmp_path: Path, name: str, damage) -> Path:
    """A copy of a build whose clip tables `damage(tables)` rewrites."""
    out = tmp_path / name
    shutil.copytree(data_dir, out)
    path = out / "raer/64px" / str(Builder.VERSION) / "metadata.json"
    metadata = json.loads(path.read_text())
    damage(metadata[frame_records.METADATA_KEY])
    path.write_text(json.dumps(metadata))
    return out


def test_a_damaged_build_is_refused(synthetic_build, tmp_path):
    _, data_dir = synthetic_build
    table = clip_source(data_dir, "train")[0].split.table

    def off_by_one(tables):
        tables["train"]["num_frames"][0] += 1

    bad = _damaged_copy(data_dir, tmp_path, "off_by_one", off_by_one)
    with pytest.raises(errors.BadInputError, match=r"train split .*counts \d+ frames, the records"):
        clip_source(bad, "train")
    clip_source(bad, "test")  # the other split is intact

    def swapped(tables):
        for column in tables["train"].values():
            column[0], column[1] = column[1], column[0]

    bad = _damaged_copy(data_dir, tmp_path, "swapped", swapped)
    source = clip_source(bad, "train")  # same total: opens
    first, second = (re.escape(v) for v in table.video_ids[:2])
    with pytest.raises(
        errors.BadInputError,
        match=rf"record 0 is frame 0 of {first} \(label \d+, \d+ frames\), but the clip table "
        rf"puts frame 0 of {second} \(label",
    ):
        source[0].read([0])
    with pytest.raises(errors.BadInputError, match="the build is damaged"):
        source[1].read_all()

    def moved_one_frame(tables):  # same clips in the same order, same total
        tables["train"]["num_frames"][0] -= 1
        tables["train"]["num_frames"][1] += 1

    bad = _damaged_copy(data_dir, tmp_path, "moved", moved_one_frame)
    source = clip_source(bad, "train")
    n = table.num_frames[0]
    # clip 0's first frame is where the table says, but the record knows the clip's real length
    with pytest.raises(
        errors.BadInputError,
        match=rf"record 0 is frame 0 of {first} \(label \d+, {n} frames\), but the clip table puts "
        rf"frame 0 of {first} \(label \d+, {n - 1} frames\)",
    ):
        source[0].read([0])
    with pytest.raises(errors.BadInputError, match=rf"record {n - 1} is frame {n - 1} of {first}"):
        source[1].read([0])

    bad = _damaged_copy(data_dir, tmp_path, "no_table", lambda tables: tables.pop("test"))
    with pytest.raises(errors.BadInputError, match="test split .*no clip table"):
        clip_source(bad, "test")


def test_statistics_in_metadata(synthetic_build):
    manual, data_dir = synthetic_build
    builder = tfds.builder("raer/64px", data_dir=str(data_dir))
    stats = builder.info.metadata["statistics"]
    faces = json.loads((manual / "face_boxes.json").read_text())
    rows = _annotations(manual)
    assert stats["train"]["num_clips"] + stats["test"]["num_clips"] == 12
    assert stats["train"]["frames_stored"] + stats["test"]["frames_stored"] == sum(
        n for n, _ in rows.values()
    )
    missing = sum(n - len(faces[d]) for d, (n, _) in rows.items())
    assert (
        stats["train"]["frames_without_face_box"] + stats["test"]["frames_without_face_box"]
        == missing
    )
    assert builder.info.metadata["build_options"]["skip_bad_clips"] is False
    assert builder.info.metadata["build_options"]["jpeg_subsampling"] == "4:4:4"  # the default
    assert builder.info.file_format.value == "array_record"


# ----------------------------------------------------------------------------- options


def test_validation_split_max_frames_prefix_map_and_quality(tmp_path):
    manual = tmp_path / "manual"
    synthetic.generate(
        manual, 40, seed=2, label_noise=0.0, min_frames=5, max_frames=9, width=64, height=48
    )
    # absolute frames_dir under a prefix that does not exist here, mapped back by path_prefix_map
    for split in ("train", "test"):
        rewrite(manual / f"{split}.txt", "clips/", "/old/raer/clips/")
    for name in ("face_boxes.json", "body_boxes.json"):
        rewrite(manual / name, '"clips/', '"/old/raer/clips/')
    opts = dict(
        validation_fraction=0.25,
        validation_seed=1,
        max_frames=4,
        path_prefix_map=[("/old/raer/", f"{manual}/")],
    )
    b = build(manual, tmp_path / "a", **opts)
    splits = b.info.splits
    val = clip_source(tmp_path / "a", "validation")
    train = clip_source(tmp_path / "a", "train")
    assert len(train) + len(val) == 32
    # train holds 13/3/3/6/7 clips per class; round(0.25 * n) each, at least one
    assert len(val) == 9
    # one record per frame: max_frames=4 of the 5-9 frames of every clip
    assert splits["validation"].num_examples == 9 * 4 and splits["train"].num_examples == 23 * 4
    val_ids = set(val.video_ids)
    assert not val_ids & set(train.video_ids)
    assert all(v.startswith("/old/raer/clips/") for v in val_ids)
    assert sorted(clip.label for clip in val) == [0, 0, 0, 1, 2, 3, 3, 4, 4]
    assert all(clip.num_frames == 4 for clip in val)
    records = tfds.data_source("raer/64px", split="validation", data_dir=str(tmp_path / "a"))
    assert all(records[i]["num_frames"] == 4 for i in range(len(records)))
    # the same seed picks the same clips; the JPEG options change the bytes stored
    b2 = build(manual, tmp_path / "b", jpeg_quality=40, jpeg_subsampling="4:2:0", **opts)
    assert b2.info.metadata["build_options"]["jpeg_subsampling"] == "4:2:0"
    assert set(clip_source(tmp_path / "b", "validation").video_ids) == val_ids
    s1, s2 = b.info.metadata["statistics"], b2.info.metadata["statistics"]
    assert s2["train"]["bytes_stored"] < 0.8 * s1["train"]["bytes_stored"]


def test_any_image_format_and_the_built_frames(tmp_path):
    manual = dummy_copy(tmp_path)
    im = Image.open(manual / "clips/a04/000002.jpg")
    im.save(manual / "clips/a04/000002.bmp")
    (manual / "clips/a04/000002.jpg").unlink()
    (manual / "clips/a04/notes.txt").write_text("not a frame")
    grey = Image.open(manual / "clips/b01/000001.jpg").convert("L")
    (manual / "clips/b01/000001.jpg").unlink()
    grey.save(manual / "clips/b01/000001.png")  # greyscale PNG: stored as RGB
    boxes = json.loads((manual / "face_boxes.json").read_text())
    boxes["clips/b01"]["000001.png"] = boxes["clips/b01"].pop("000001.jpg")
    boxes["clips/a04"]["000002.bmp"] = boxes["clips/a04"].pop("000002.jpg")
    (manual / "face_boxes.json").write_text(json.dumps(boxes))
    b = build(manual, tmp_path / "d")
    ex = {clip.video_id: clip for clip in clip_source(tmp_path / "d", "train")}
    a04 = ex["clips/a04"].read_all()
    assert ex["clips/a04"].num_frames == 3 and len(a04["face"]) == 3
    assert all(a04["face_box_found"])
    assert ex["clips/a01"].read_all()["face_box_found"] == [True, False, True]
    assert b.info.metadata["statistics"]["train"]["clips_without_body_box"] == 1
    test = clip_source(tmp_path / "d", "test")
    b01 = next(clip for clip in test if clip.video_id == "clips/b01").read_all()
    assert all(b01["face_box_found"]) and len(b01["face"]) == 2
    # the greyscale PNG frame is stored as RGB (PIL's own decoding, no conversion)
    assert [Image.open(io.BytesIO(f)).mode for f in b01["face"] + b01["context"]] == ["RGB"] * 4
    assert [np.asarray(Image.open(io.BytesIO(f))).shape[2] for f in b01["face"]] == [3, 3]


# ----------------------------------------------------------------------------- bad input
# Dataset-level problems stop the build, with or without skip_bad_clips.


def _expect(tmp_path, manual, match, **options):
    with pytest.raises(RaerFormatError, match=match):
        build(manual, tmp_path / "d", **options)


def test_missing_manual_dir(tmp_path):
    with pytest.raises(RaerFormatError, match="manual_dir missing") as e:
        build(tmp_path / "nowhere", tmp_path / "d")
    for name in ("train.txt", "test.txt", "face_boxes.json", "body_boxes.json"):
        assert name in str(e.value)  # the manual download instructions list the files


@pytest.mark.parametrize("skip", [False, True])
def test_missing_files_stop_the_build(tmp_path, skip):
    manual = dummy_copy(tmp_path)
    (manual / "test.txt").unlink()
    _expect(tmp_path, manual, r"test\.txt: annotation file not found", skip_bad_clips=skip)
    (manual / "body_boxes.json").unlink()
    _expect(tmp_path, manual, r"body_boxes\.json: file not found", skip_bad_clips=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_box_json_top_level_shape(tmp_path, skip):
    manual = dummy_copy(tmp_path)
    (manual / "body_boxes.json").write_text("[[1, 2, 3, 4]]")
    _expect(
        tmp_path,
        manual,
        r"body_boxes\.json: expected a JSON object keyed by frames_dir, got list",
        skip_bad_clips=skip,
    )
    (manual / "body_boxes.json").write_text("{not json")
    _expect(tmp_path, manual, r"body_boxes\.json: not valid JSON", skip_bad_clips=skip)


# Clip-level problems: (id, mutation, message of the default mode, skip reason, split, bad clip).
BODY_A01 = '"clips/a01": [\n  6,\n  2,\n  34,\n  30\n ]'


def _face_a01(value):
    def mutate(m):
        boxes = json.loads((m / "face_boxes.json").read_text())
        boxes["clips/a01"]["000001.jpg"] = value
        (m / "face_boxes.json").write_text(json.dumps(boxes))

    return mutate


def _line(old, new):
    return lambda m: rewrite(
        m / ("test.txt" if old.startswith("clips/b") else "train.txt"), old, new
    )


def _truncate(m):
    p = m / "clips/b02/000002.jpg"
    p.write_bytes(p.read_bytes()[:200])


def _empty(m):
    for p in (m / "clips/a03").iterdir():
        p.unlink()


CLIP_CASES = [
    (
        "label_high",
        _line("clips/a02 2 2", "clips/a02 2 6"),
        r"train\.txt:2: label 6 outside 1\.\.5 \(the label set's classes\)",
        "bad_label",
        "train",
        "clips/a02",
    ),
    (
        "label_zero",
        _line("clips/a02 2 2", "clips/a02 2 0"),
        r"train\.txt:2: label 0 outside",
        "bad_label",
        "train",
        "clips/a02",
    ),
    (
        "double_space",
        _line("clips/a02 2 2", "clips/a02  2 2"),
        r"train\.txt:2: expected '<frames_dir> <num_frames> <label>'",
        "malformed_line",
        "train",
        "clips/a02",
    ),
    (
        "two_fields",
        _line("clips/a02 2 2", "clips/a02 2"),
        r"train\.txt:2: expected",
        "malformed_line",
        "train",
        "clips/a02",
    ),
    (
        "not_int",
        _line("clips/a02 2 2", "clips/a02 two 2"),
        r"train\.txt:2: num_frames and label must be integers",
        "malformed_line",
        "train",
        "clips/a02",
    ),
    (
        "num_frames",
        _line("clips/a02 2 2", "clips/a02 3 2"),
        r"train\.txt:2: the line says 3 frames but .*a02 holds 2",
        "num_frames_mismatch",
        "train",
        "clips/a02",
    ),
    (
        "missing_dir",
        _line("clips/a02 2 2", "clips/zz 2 2"),
        r"train\.txt:2: frames folder .*clips/zz not found",
        "missing_frames_dir",
        "train",
        "clips/zz",
    ),
    (
        "empty_dir",
        _empty,
        r"train\.txt:3: frames folder .*a03 holds no image files",
        "empty_frames_dir",
        "train",
        "clips/a03",
    ),
    (
        "duplicate",
        _line("clips/a02 2 2", "clips/a01 3 2"),
        r"train\.txt:2: clips/a01 already listed at train\.txt:1",
        "duplicate_clip",
        "train",
        None,
    ),
    (
        "duplicate_across_splits",
        _line("clips/b01 2 3", "clips/a02 2 3"),
        r"test\.txt:1: clips/a02 already listed at train\.txt:2",
        "duplicate_clip",
        "test",
        None,
    ),
    (
        "truncated_jpeg",
        _truncate,
        r"test\.txt:2: clips/b02: .*000002\.jpg: cannot decode image",
        "corrupt_image",
        "test",
        "clips/b02",
    ),
    (
        "garbage_jpeg",
        lambda m: (m / "clips/b02/000002.jpg").write_bytes(b"not a jpeg"),
        r"test\.txt:2: clips/b02: .*000002\.jpg: cannot decode image",
        "corrupt_image",
        "test",
        "clips/b02",
    ),
    (
        "face_box_outside",
        _face_a01([14, 4, 60, 16]),
        r"train\.txt:1: clips/a01: face box of 000001\.jpg .* lies outside the 40x30 image",
        "box_outside_image",
        "train",
        "clips/a01",
    ),
    (
        "body_box_outside",
        lambda m: rewrite(m / "body_boxes.json", BODY_A01, '"clips/a01": [-6, 2, 34, 30]'),
        r"train\.txt:1: clips/a01: body box .* lies outside",
        "box_outside_image",
        "train",
        "clips/a01",
    ),
    (
        "left_ge_right",
        _face_a01([26, 4, 14, 16]),
        r"train\.txt:1: .*face_boxes\.json\['clips/a01'\]\['000001\.jpg'\]: box .* needs left < right",
        "bad_box",
        "train",
        "clips/a01",
    ),
    (
        "box_three_numbers",
        _face_a01([14, 4, 26]),
        r"train\.txt:1: .*expected \[left, upper, right, lower\] numbers",
        "bad_box",
        "train",
        "clips/a01",
    ),
    (
        "body_entry_shape",
        lambda m: rewrite(m / "body_boxes.json", BODY_A01, '"clips/a01": {"x": 1}'),
        r"train\.txt:1: .*body_boxes\.json\['clips/a01'\]: expected \[left",
        "bad_box",
        "train",
        "clips/a01",
    ),
    (
        "face_entry_shape",
        lambda m: rewrite(m / "face_boxes.json", '"clips/a01": {', '"clips/a01": [1], "x": {'),
        r"train\.txt:1: .*face_boxes\.json\['clips/a01'\]: expected \{frame_file",
        "bad_box",
        "train",
        "clips/a01",
    ),
]


@pytest.mark.parametrize("case", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_bad_clip_stops_the_build(tmp_path, case):
    _, mutate, match, _, _, _ = case
    manual = dummy_copy(tmp_path)
    mutate(manual)
    _expect(tmp_path, manual, match)


@pytest.mark.parametrize("case", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_bad_clip_skipped_and_counted(tmp_path, capsys, case):
    _, mutate, match, reason, split, bad_id = case
    manual = dummy_copy(tmp_path)
    mutate(manual)
    b = build(manual, tmp_path / "d", skip_bad_clips=True)
    expected = {"train": 4, "test": 2}
    expected[split] -= 1
    sources = {k: clip_source(tmp_path / "d", k) for k in expected}
    assert {k: len(source) for k, source in sources.items()} == expected
    # one record per frame of the clips kept, in the order of the annotation file
    for k, source in sources.items():
        assert b.info.splits[k].num_examples == sum(map(frames_of, source.video_ids))
        listed = [line.split(" ")[0] for line in (DUMMY / f"{k}.txt").read_text().splitlines()]
        assert source.video_ids == [d for d in listed if d in source.video_ids]
        for clip in source:
            assert len(clip.read_all()["face"]) == clip.num_frames  # the records are the table's
    skipped = b.info.metadata["statistics"][split]["skipped"]
    assert skipped["by_reason"] == {reason: 1}
    assert re.search(match, skipped["first"][0])
    ids = sources[split].video_ids
    assert bad_id not in ids and len(set(ids)) == len(ids)
    err = capsys.readouterr().err
    assert f"{split}: " in err and "SKIPPED 1 bad clips" in err and reason in err


def test_skip_bad_clips_several_reasons(tmp_path, capsys):
    manual = dummy_copy(tmp_path)
    rewrite(manual / "train.txt", "clips/a02 2 2", "clips/a02 2 9")  # bad label
    rewrite(manual / "train.txt", "clips/a03 2 4", "clips/a03 5 4")  # frame count
    (manual / "clips/b02/000003.jpg").write_bytes(b"garbage")  # corrupt, found while cropping
    b = build(manual, tmp_path / "d", skip_bad_clips=True)
    assert clip_source(tmp_path / "d", "train").video_ids == ["clips/a01", "clips/a04"]
    assert clip_source(tmp_path / "d", "test").video_ids == ["clips/b01"]
    # frame records: 3 + 3 in train, 2 in test
    assert b.info.splits["train"].num_examples == 6 and b.info.splits["test"].num_examples == 2
    stats = b.info.metadata["statistics"]
    assert stats["train"]["skipped"]["by_reason"] == {"bad_label": 1, "num_frames_mismatch": 1}
    assert stats["test"]["skipped"]["by_reason"] == {"corrupt_image": 1}
    assert "train.txt:2" in stats["train"]["skipped"]["first"][0]
    err = capsys.readouterr().err
    assert "SKIPPED 2 bad clips" in err and "train.txt:3" in err
    # reloaded from disk
    again = tfds.builder("raer/64px", data_dir=str(tmp_path / "d"))
    assert again.info.metadata["statistics"]["test"]["skipped"]["total"] == 1
    assert again.info.metadata["build_options"]["skip_bad_clips"] is True


def test_split_with_no_usable_clip(tmp_path):
    manual = dummy_copy(tmp_path)
    (manual / "test.txt").write_text("clips/b01 2 7\nclips/b02 3 0\n")
    _expect(
        tmp_path,
        manual,
        r"test split: no usable clip \(2 skipped: .*bad_label",
        skip_bad_clips=True,
    )


def test_options_from_a_config_of_its_own(tmp_path):
    """A RaerConfig with options, as the stock `tfds build --config='{...}'` makes one from JSON
    (tests/test_tfds_cli.py): its own dataset, read back by its name."""
    manual = dummy_copy(tmp_path)
    rewrite(manual / "train.txt", "clips/a02 2 2", "clips/a02 2 9")
    (manual / "train.txt").rename(manual / "train_list.txt")
    listed = Builder.builder_config_cls(
        **json.loads(
            '{"name": "64px_listed", "image_size": 64, "skip_bad_clips": true, '
            '"train_file": "train_list.txt", "path_prefix_map": [["/old/", "/new/"]]}'
        )
    )
    b = Builder(config=listed, data_dir=str(tmp_path / "own"))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert clip_source(tmp_path / "own", "train", "64px_listed").video_ids == [
        "clips/a01",
        "clips/a03",
        "clips/a04",
    ]
    assert b.info.splits["train"].num_examples == 3 + 2 + 3  # frame records
    assert b.info.metadata["build_options"]["train_file"] == "train_list.txt"
    assert b.info.metadata["build_options"]["path_prefix_map"] == [["/old/", "/new/"]]
    # keyword arguments win over the config's fields, and a pickled builder keeps both
    given = Builder(config=listed, data_dir=str(tmp_path / "other"), skip_bad_clips=False)
    again = pickle.loads(pickle.dumps(given))
    assert not again.options.skip_bad_clips and again.options.train_file == "train_list.txt"
    with pytest.raises(ValueError, match="config '64px_big' has image_size 224"):
        Builder(config=Builder.builder_config_cls(name="64px_big"))


def test_bad_options():
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        Builder(config="64px", validation_fraction=1.0)
    with pytest.raises(ValueError, match="path_prefix_map entries"):
        Builder(config="64px", path_prefix_map=[("a",)])
    with pytest.raises(ValueError, match=r"image_format must be one of \('jpeg', 'png'\)"):
        Builder(config="64px", image_format="webp")
    with pytest.raises(ValueError, match=r"jpeg_subsampling must be one of \('4:4:4', '4:2:0'\)"):
        Builder(config="64px", jpeg_subsampling="4:1:1")
    with pytest.raises(ValueError, match="label set 'raer4': neither a built-in set"):
        Builder(config="64px", label_set="raer4")


def test_worker_threads_write_the_same_records(tmp_path):
    """Frames cropped by several threads (the default: one per core) give the records of a
    build in the writing thread, byte for byte and in the same order."""
    built = {w: build(DUMMY, tmp_path / f"w{w}", num_workers=w) for w in (1, 3, 0)}
    assert built[1].info.metadata["build_options"]["num_workers"] == 1
    tables = [b.info.metadata[frame_records.METADATA_KEY] for b in built.values()]
    assert all(t == tables[0] for t in tables[1:])
    for split in ("train", "test"):
        sources = [raw_records(tmp_path / f"w{w}", split) for w in built]
        one = sources[0]
        assert len(one) == sum(tables[0][split]["num_frames"])
        for other in sources[1:]:
            assert len(other) == len(one)
            for i in range(len(one)):
                for field in ("video_id", "frame_index", "face", "context", "face_box_found"):
                    assert other[i][field] == one[i][field], (split, i, field)


def test_first_bad_frame_reported_whatever_the_threads(tmp_path):
    manual = dummy_copy(tmp_path)
    for name in ("000002.jpg", "000003.jpg"):  # two bad frames: the first one is named
        (manual / "clips/b02" / name).write_bytes(b"garbage")
    for w in (1, 2):
        with pytest.raises(RaerFormatError, match=r"test\.txt:2: clips/b02: .*000002\.jpg"):
            build(manual, tmp_path / f"w{w}", num_workers=w)


def test_build_rate_reports(capsys):
    from tfds_raer.raer import benchmark

    r = benchmark.build_rate(DUMMY, config="64px", num_workers=1)
    assert (
        r["clips"] == 6 and r["frames"] == 15 and r["clips_per_s"] > 0 and r["write_MB_per_s"] > 0
    )
    assert '"clips_per_s"' in capsys.readouterr().out
