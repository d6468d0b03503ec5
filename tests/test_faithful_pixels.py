"""Stored crops and pipeline frames against the authors' preprocessing, on real photographs.

The expected pixels are computed here from the source frame, step by step as REFERENCE.md
describes the authors' data loader (PIL crops, OpenCV letterbox with its BGR round trip, PIL
rotate -> resize -> flip), without the builder's or the pipeline's code. With PNG storage the
stored crops and the pipeline's frames must equal them exactly; with the default JPEG storage
the stored crops are exactly the JPEG encoding of them.
"""

import io
import json

import cv2
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

import tfds_raer  # noqa: F401  (registers "raer")
from caer_jax.data import augment, pipeline, sampling
from caer_jax.data.clips import ClipSource
from tfds_raer.raer import raer_lib

SIZE = 224
FRAME_SIZES = ((1280, 720), (640, 480), (517, 333), (389, 601))
PHOTOS = ("astronaut", "coffee", "chelsea")


def _frames(photo: str, size: tuple[int, int]) -> list[Image.Image]:
    base = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB").resize(size)
    # a second, different frame: the photo shifted by a few pixels
    return [base, Image.fromarray(np.roll(np.asarray(base), (7, -11), axis=(0, 1)))]


def _clips():
    """(frames_dir, frames, face boxes per frame or None, body box or None) of every clip."""
    clips = []
    for i, photo in enumerate(PHOTOS):
        for j, (w, h) in enumerate(FRAME_SIZES):
            face = [0.31 * w + 0.4, 0.2 * h + 0.7, 0.55 * w + 0.3, 0.5 * h + 0.2]
            # body boxes with fractional coordinates, one at .5 (PIL's crop rounds half to even)
            body = [0.1 * w + 0.3, 10.5, 0.9 * w - 0.6, h - 3.5] if (i + j) % 3 else None
            clips.append((f"clips/{photo}_{w}x{h}", _frames(photo, (w, h)), [face, None], body))
    return clips


def authors_face(frame: Image.Image, box) -> np.ndarray:
    if box is None:
        return np.asarray(frame)
    left, upper, right, lower = (int(v) for v in box)
    region = (
        max(0, left - 20),
        max(0, upper - 20),
        min(frame.width, right + 20),
        min(frame.height, lower + 20),
    )
    return np.asarray(frame.crop(region))


def authors_context(frame: Image.Image, box) -> np.ndarray:
    crop = frame.crop(tuple(box)) if box is not None else frame
    bgr = cv2.cvtColor(np.array(crop), cv2.COLOR_RGB2BGR)
    h, w = bgr.shape[:2]
    ratio = min(SIZE / w, SIZE / h)
    new_w, new_h = int(w * ratio), int(h * ratio)
    bgr = cv2.resize(bgr, (new_w, new_h))
    pad_w, pad_h = SIZE - new_w, SIZE - new_h
    bgr = cv2.copyMakeBorder(
        bgr,
        pad_h // 2,
        pad_h - pad_h // 2,
        pad_w // 2,
        pad_w - pad_w // 2,
        cv2.BORDER_CONSTANT,
        value=[0, 0, 0],
    )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def authors_train_transform(crops: list[np.ndarray], angle: float, flip: bool) -> np.ndarray:
    images = [Image.fromarray(c).rotate(angle) for c in crops]
    images = [im.resize((SIZE, SIZE), Image.BILINEAR) for im in images]
    if flip:
        images = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
    return np.stack([np.asarray(im) for im in images])


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    manual = root / "manual"
    clips = _clips()
    faces, bodies, lines = {}, {}, []
    for k, (frames_dir, frames, face_boxes, body) in enumerate(clips):
        (manual / frames_dir).mkdir(parents=True)
        for t, frame in enumerate(frames):
            frame.save(manual / frames_dir / f"{t:06d}.png")  # lossless source frames
        faces[frames_dir] = {f"{t:06d}.png": b for t, b in enumerate(face_boxes) if b}
        if body is not None:
            bodies[frames_dir] = body
        lines.append(f"{frames_dir} {len(frames)} {k % 5 + 1}")
    (manual / "train.txt").write_text("\n".join(lines[3:]) + "\n")
    (manual / "test.txt").write_text("\n".join(lines[:3]) + "\n")
    (manual / "face_boxes.json").write_text(json.dumps(faces))
    (manual / "body_boxes.json").write_text(json.dumps(bodies))
    built = {}
    for image_format in ("png", "jpeg"):
        data_dir = root / image_format
        builder = tfds.builder("raer/224px", data_dir=str(data_dir), image_format=image_format)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
        built[image_format] = data_dir
    return {c[0]: c for c in clips}, built


def _stored_clips(data_dir) -> ClipSource:
    """Every stored clip, train then test."""
    source = ClipSource.open("raer/224px", "train+test", str(data_dir))
    assert len(source) == len(PHOTOS) * len(FRAME_SIZES)
    return source


def _records(data_dir):
    """(video_id, {"face": [bytes], "context": [bytes], ...}) of every clip: all its frames."""
    for clip in _stored_clips(data_dir):
        yield clip.video_id, clip.read_all()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(augment.decode_image(data))


def test_lossless_storage_holds_the_authors_crops_exactly(photo_dataset):
    clips, built = photo_dataset
    checked = 0
    for video_id, record in _records(built["png"]):
        _, frames, face_boxes, body = clips[video_id]
        assert len(record["face"]) == len(record["context"]) == len(frames)
        for t, frame in enumerate(frames):
            np.testing.assert_array_equal(
                _decode(record["face"][t]), authors_face(frame, face_boxes[t])
            )
            np.testing.assert_array_equal(
                _decode(record["context"][t]), authors_context(frame, body)
            )
            checked += 1
    assert checked == 2 * len(PHOTOS) * len(FRAME_SIZES)


def test_jpeg_storage_is_the_jpeg_of_the_authors_crops(photo_dataset):
    clips, built = photo_dataset
    errors = []
    for video_id, record in _records(built["jpeg"]):
        _, frames, face_boxes, body = clips[video_id]
        assert len(record["face"]) == len(record["context"]) == len(frames)
        for t, frame in enumerate(frames):
            for stored, want in (
                (record["face"][t], authors_face(frame, face_boxes[t])),
                (record["context"][t], authors_context(frame, body)),
            ):
                assert stored[:2] == b"\xff\xd8"
                got = _decode(stored)
                jpeg = io.BytesIO()
                # independent of raer_lib: the default, quality 95 with full-resolution chroma
                Image.fromarray(want).save(jpeg, format="JPEG", quality=95, subsampling="4:4:4")
                np.testing.assert_array_equal(got, np.asarray(Image.open(jpeg)))
                errors.append(np.abs(got.astype(np.float32) - want).mean())
    # quality 95, 4:4:4, on photographs: about 1 level of 255 on average (README's figures)
    assert 0.2 < np.mean(errors) < 2.0 and max(errors) < 3.0


@pytest.mark.parametrize("seed", range(4))
def test_train_frames_follow_the_authors_order_rotate_resize_flip(photo_dataset, seed):
    clips, built = photo_dataset
    loader = pipeline.ClipLoader(
        num_segments=3, duration=1, image_size=SIZE, rotation_degrees=4.0, flip_prob=0.5
    )
    draws = set()
    for index, clip in enumerate(_stored_clips(built["png"])):
        _, frames, face_boxes, body = clips[clip.video_id]
        assert clip.num_frames == len(frames)
        out = loader.load(clip, index, np.random.default_rng([seed, index]))
        # the loader's draws, in its order: frame offsets, then the face, then the context
        rng = np.random.default_rng([seed, index])
        offsets = sampling.train_indices(len(frames), 3, 1, rng)
        picked = sampling.frame_indices(offsets, 1, len(frames))
        face_draw = augment.random_draw(rng, 4.0, 0.5)
        context_draw = augment.random_draw(rng, 4.0, 0.5)
        draws.update({face_draw.flip, context_draw.flip})
        want_face = authors_train_transform(
            [authors_face(frames[t], face_boxes[t]) for t in picked],
            face_draw.angle,
            face_draw.flip,
        )
        want_context = authors_train_transform(
            [authors_context(frames[t], body) for t in picked],
            context_draw.angle,
            context_draw.flip,
        )
        np.testing.assert_array_equal(np.asarray(out["face"]), want_face)
        np.testing.assert_array_equal(np.asarray(out["context"]), want_context)
    assert draws == {True, False}  # both flip outcomes were checked


def test_our_letterbox_is_the_authors_and_differs_from_pil_on_photos():
    for photo in PHOTOS:
        for size in FRAME_SIZES:
            frame = _frames(photo, size)[0]
            ours = np.asarray(raer_lib.letterbox(frame, SIZE))
            np.testing.assert_array_equal(ours, authors_context(frame, None))
            # what a PIL bilinear resize (antialiased when shrinking) would have stored instead
            w, h = frame.size
            r = min(SIZE / w, SIZE / h)
            pil = np.zeros_like(ours)
            scaled = np.asarray(frame.resize((int(w * r), int(h * r)), Image.BILINEAR))
            top, left = (SIZE - scaled.shape[0]) // 2, (SIZE - scaled.shape[1]) // 2
            pil[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
            assert np.abs(pil.astype(np.float32) - ours).mean() > 0.5
