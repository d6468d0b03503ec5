"""Reading and checking the RAER release layout, and the face/context crops the builder stores.

No TensorFlow here: the builder (raer_dataset_builder.py) and the benchmark call these functions,
tests call them to compute expected crops. Paths are `epath.Path`s so that manual_dir may live on
a cloud bucket.

Layout (manual_dir):
  <frames_dir>/<frame files>   one folder per clip, frames in sorted file-name order
  train.txt, test.txt          lines "<frames_dir> <num_frames> <label 1..n>", single spaces
                               (n classes of the label set, caer_jax.label_sets; 5 for RAER)
  face_boxes.json              {frames_dir: {frame_file_name: [left, upper, right, lower]}}
  body_boxes.json              {frames_dir: [left, upper, right, lower]}
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
from etils import epath
from PIL import Image

from caer_jax import errors

ANNOTATION_FILES = {"train": "train.txt", "test": "test.txt"}
FACE_BOXES_FILE = "face_boxes.json"
BODY_BOXES_FILE = "body_boxes.json"
FACE_MARGIN = 20  # pixels added on every side of a face box before cropping (REFERENCE.md)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


@dataclasses.dataclass(frozen=True)
class LayoutFiles:
    """Names of the annotation and box files in manual_dir (builder config fields)."""

    train: str = ANNOTATION_FILES["train"]
    test: str = ANNOTATION_FILES["test"]
    face_boxes: str = FACE_BOXES_FILE
    body_boxes: str = BODY_BOXES_FILE

    @property
    def splits(self) -> dict[str, str]:
        return {"train": self.train, "test": self.test}


class RaerFormatError(errors.BadInputError):
    """The manual_dir does not hold a readable RAER layout; the message names file and line."""


class BadClip(Exception):
    """One clip cannot be used. `reason` is a short code for the skip report."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One annotation line, resolved against the folder and the box files."""

    video_id: str  # frames_dir exactly as written (the key of the box files)
    frames_path: str  # folder that holds the frames (after prefix mapping)
    frame_files: tuple[str, ...]  # sorted frame file names
    label: int  # 0-based
    source: str  # "train.txt:12"
    line: str
    face_boxes: dict[str, Box]
    body_box: Box | None
    files: LayoutFiles = LayoutFiles()

    @property
    def annotation(self) -> str:
        return f"{self.source} {self.line}"


# ----------------------------------------------------------------------------- crops


def face_region(box: Sequence[float] | None, width: int, height: int) -> tuple[int, int, int, int]:
    """The face box grown by FACE_MARGIN on every side, clamped; the whole frame without a box.

    As the authors: each coordinate truncated with int() before the margin is added.
    """
    if box is None:
        return 0, 0, width, height
    left, upper, right, lower = (int(v) for v in box)
    return (
        max(0, left - FACE_MARGIN),
        max(0, upper - FACE_MARGIN),
        min(width, right + FACE_MARGIN),
        min(height, lower + FACE_MARGIN),
    )


def crop_face(img: Image.Image, box: Sequence[float] | None) -> Image.Image:
    """Face stream crop at its source size: the margin-grown box (the whole frame without one).

    The pipeline rotates it, then resizes it to the model's size, as the authors' transform.
    """
    return img.crop(face_region(box, *img.size))


def letterbox(img: Image.Image, size: int) -> Image.Image:
    """The authors' context letterbox (OpenCV): fit size x size keeping the aspect, pad black.

    r = min(size / w, size / h); the scaled sides are int(w * r), int(h * r) (truncated);
    cv2.resize with its default INTER_LINEAR (no antialiasing when shrinking); then
    cv2.copyMakeBorder with black, (size - side) // 2 on each side and the odd pixel at the
    bottom/right. The authors convert RGB to BGR before and back after; both OpenCV steps work
    on each channel alone, so running them on the RGB array gives the same pixels.
    """
    w, h = img.size
    if w == 0 or h == 0:
        raise BadClip("degenerate_crop", f"an empty {w}x{h} crop cannot be letterboxed")
    r = min(size / w, size / h)
    nw, nh = int(w * r), int(h * r)
    if nw == 0 or nh == 0:
        raise BadClip(
            "degenerate_crop", f"a {w}x{h} crop letterboxed to {size} px keeps no row or column"
        )
    scaled = cv2.resize(np.asarray(img), (nw, nh))  # default interpolation: INTER_LINEAR
    top, left = (size - nh) // 2, (size - nw) // 2
    bottom, right = size - nh - top, size - nw - left
    padded = cv2.copyMakeBorder(
        scaled, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0)
    )
    return Image.fromarray(padded)


def crop_context(img: Image.Image, box: Sequence[float] | None, size: int) -> Image.Image:
    """Context stream crop: the body box (PIL crop, which rounds the coordinates; the whole
    frame without a box), letterboxed to size x size."""
    if box is not None:
        img = img.crop(tuple(box))
    return letterbox(img, size)


def load_rgb(path: epath.Path) -> Image.Image:
    """Decodes an image file fully (truncated files raise), as RGB."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


# Storage encodings of the crops: JPEG (lossy, `jpeg_quality`, chroma at `jpeg_subsampling`) or
# PNG (lossless).
IMAGE_FORMATS = ("jpeg", "png")
# Colour resolution of JPEG crops: full (4:4:4) or halved both ways (4:2:0, Pillow's default).
JPEG_SUBSAMPLINGS = ("4:4:4", "4:2:0")
# zlib level 1: on 224 px photo crops 5-6 % larger files than level 6, encoded 2-5x faster.
PNG_COMPRESS_LEVEL = 1


def encode_image(
    img: Image.Image, image_format: str, jpeg_quality: int, jpeg_subsampling: str
) -> bytes:
    """The crop as stored: JPEG at `jpeg_quality` with `jpeg_subsampling` chroma, or PNG."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=jpeg_subsampling)
    elif image_format == "png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buf.getvalue()


def subsample(num: int, max_frames: int) -> list[int]:
    """Indices of at most `max_frames` frames spread uniformly (centre of equal bins); 0 = all."""
    if max_frames <= 0 or num <= max_frames:
        return list(range(num))
    return [int((i + 0.5) * num / max_frames) for i in range(max_frames)]


def _check_box_in_image(box: Box, width: int, height: int, what: str) -> None:
    left, upper, right, lower = box
    if left < 0 or upper < 0 or right > width or lower > height:
        raise BadClip(
            "box_outside_image", f"{what} {list(box)} lies outside the {width}x{height} image"
        )


@dataclasses.dataclass(frozen=True)
class Storage:
    """How crops are stored: the context letterbox size and the image encoding."""

    image_size: int  # context crops are letterboxed to image_size x image_size
    image_format: str = "jpeg"  # one of IMAGE_FORMATS
    jpeg_quality: int = 95
    jpeg_subsampling: str = "4:4:4"  # one of JPEG_SUBSAMPLINGS

    def encode(self, img: Image.Image) -> bytes:
        return encode_image(img, self.image_format, self.jpeg_quality, self.jpeg_subsampling)


def encode_frame(clip: ClipSpec, name: str, *, storage: Storage) -> tuple[bytes, bytes, bool]:
    """Decodes and checks one frame of `clip`; returns (face, context, face box found), the
    crops encoded as `storage` says: the face at its source size, the context letterboxed.

    Raises BadClip for an undecodable frame or a box outside it. Thread-safe: the builder runs
    it on several frames at once (Pillow and OpenCV release the GIL while they decode, resize,
    encode).
    """
    path = epath.Path(clip.frames_path) / name
    try:
        img = load_rgb(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadClip("corrupt_image", f"{path}: cannot decode image: {e}") from None
    w, h = img.size
    box = clip.face_boxes.get(name)
    if box is not None:
        _check_box_in_image(box, w, h, f"face box of {name} ({clip.files.face_boxes})")
    if clip.body_box is not None:
        _check_box_in_image(
            clip.body_box, w, h, f"body box ({clip.files.body_boxes}) of frame {name}"
        )
    face = storage.encode(crop_face(img, box))
    context = storage.encode(crop_context(img, clip.body_box, storage.image_size))
    return face, context, box is not None


def start_clip(
    clip: ClipSpec,
    *,
    storage: Storage,
    max_frames: int = 0,
    map_fn: Callable[..., Iterator] = map,
) -> Iterator[tuple[bytes, bytes, bool]]:
    """encode_frame over the stored frames of `clip`, in order, through `map_fn`.

    With the builtin `map` nothing runs until finish_clip iterates; with a thread pool's `map`
    every frame is submitted at once, so frames of the next clips are cropped while the
    caller writes the current one.
    """
    names = [clip.frame_files[i] for i in subsample(len(clip.frame_files), max_frames)]
    return map_fn(functools.partial(encode_frame, clip, storage=storage), names)


def finish_clip(
    clip: ClipSpec, frames: Iterator[tuple[bytes, bytes, bool]]
) -> dict[str, Any] | tuple[str, str]:
    """The example dict the builder writes, or (reason, message) when a frame is bad.

    Frames are collected in order, so the problem reported is that of the first bad frame,
    whatever ran them.
    """
    try:
        encoded = list(frames)
    except BadClip as e:
        return e.reason, e.message
    return {
        "video_id": clip.video_id,
        "label": clip.label,
        "num_frames": len(encoded),
        "face": [face for face, _, _ in encoded],
        "context": [context for _, context, _ in encoded],
        "face_box_found": [found for _, _, found in encoded],
        "annotation": clip.annotation,
    }


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- annotations


def _read_json(path: epath.Path) -> dict:
    if not path.exists():
        raise RaerFormatError(f"{path}: file not found (expected {path.name} in manual_dir)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RaerFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RaerFormatError(
            f"{path}: expected a JSON object keyed by frames_dir, got {type(data).__name__}"
        )
    return data


def _as_box(value: Any, where: str) -> Box:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise BadClip(
            "bad_box", f"{where}: expected [left, upper, right, lower] numbers, got {value!r}"
        )
    box = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in box):
        raise BadClip("bad_box", f"{where}: box {value!r} is not finite")
    if box[0] >= box[2] or box[1] >= box[3]:
        raise BadClip("bad_box", f"{where}: box {value!r} needs left < right and upper < lower")
    return box  # type: ignore[return-value]


def map_prefix(frames_dir: str, prefix_map: Iterable[tuple[str, str]]) -> str:
    """Rewrites an absolute frames_dir by the first matching (old_prefix, new_prefix) pair."""
    for old, new in prefix_map:
        if frames_dir.startswith(old):
            return new + frames_dir[len(old) :]
    return frames_dir


def _frame_files(folder: epath.Path) -> tuple[str, ...]:
    names = [
        p.name
        for p in folder.iterdir()
        if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")
    ]
    return tuple(sorted(names))


@dataclasses.dataclass
class Problems:
    """Clips left out in skip mode: counts by reason and the first offenders."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: list[str] = dataclasses.field(default_factory=list)
    keep_first: int = 10

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.first) < self.keep_first:
            self.first.append(message)

    def merge(self, other: Problems) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
        self.first.extend(other.first[: max(0, self.keep_first - len(self.first))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "first": list(self.first),
        }


def read_split(
    manual_dir: epath.Path,
    split_file: str,
    *,
    face_boxes: dict,
    body_boxes: dict,
    seen: dict[str, str],
    num_classes: int,
    skip_bad_clips: bool,
    problems: Problems,
    prefix_map: Sequence[tuple[str, str]] = (),
    files: LayoutFiles = LayoutFiles(),
) -> list[ClipSpec]:
    """Parses and checks one annotation file (frames on disk, boxes); returns its clips.

    Problems that concern one clip raise RaerFormatError naming file and line, or, with
    `skip_bad_clips`, leave the clip out and are recorded in `problems`. Labels are 1..num_classes
    in the file (0-based in the result). `seen` maps the
    frames_dir of clips already read (of any split) to their source, to catch duplicates.
    """
    path = manual_dir / split_file
    if not path.exists():
        raise RaerFormatError(
            f"{path}: annotation file not found; manual_dir must hold "
            f"{files.train}, {files.test}, {files.face_boxes}, {files.body_boxes} and the "
            "frame folders"
        )
    clips = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        source = f"{split_file}:{number}"
        try:
            clips.append(
                _read_line(
                    manual_dir,
                    line,
                    source,
                    face_boxes,
                    body_boxes,
                    seen,
                    prefix_map,
                    files,
                    num_classes,
                )
            )
        except BadClip as e:
            message = f"{path}:{number}: {e.message} (line: {line!r})"
            if not skip_bad_clips:
                raise RaerFormatError(message) from None
            problems.add(e.reason, message)
    return clips


def _read_line(
    manual_dir, line, source, face_boxes, body_boxes, seen, prefix_map, files, num_classes
) -> ClipSpec:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadClip(
            "malformed_line",
            "expected '<frames_dir> <num_frames> <label>' separated by single spaces",
        )
    frames_dir, num_text, label_text = parts
    try:
        num_frames, label = int(num_text), int(label_text)
    except ValueError:
        raise BadClip("malformed_line", "num_frames and label must be integers") from None
    if not 1 <= label <= num_classes:
        raise BadClip(
            "bad_label", f"label {label} outside 1..{num_classes} (the label set's classes)"
        )
    if frames_dir in seen:
        raise BadClip("duplicate_clip", f"{frames_dir} already listed at {seen[frames_dir]}")
    seen[frames_dir] = source
    resolved = map_prefix(frames_dir, prefix_map)
    folder = (
        epath.Path(resolved)
        if resolved.startswith("/") or "://" in resolved
        else manual_dir / resolved
    )
    if not folder.is_dir():
        raise BadClip("missing_frames_dir", f"frames folder {folder} not found")
    frame_files = _frame_files(folder)
    if not frame_files:
        raise BadClip("empty_frames_dir", f"frames folder {folder} holds no image files")
    if len(frame_files) != num_frames:
        raise BadClip(
            "num_frames_mismatch",
            f"the line says {num_frames} frames but {folder} holds {len(frame_files)} image files",
        )
    clip_faces = face_boxes.get(frames_dir, {})
    if not isinstance(clip_faces, dict):
        raise BadClip(
            "bad_box",
            f"{files.face_boxes}[{frames_dir!r}]: expected {{frame_file: [l, u, r, b]}}, "
            f"got {type(clip_faces).__name__}",
        )
    faces = {}
    for name, value in clip_faces.items():
        if value is None:  # an explicit miss
            continue
        faces[name] = _as_box(value, f"{files.face_boxes}[{frames_dir!r}][{name!r}]")
    body = body_boxes.get(frames_dir)
    if body is not None:
        body = _as_box(body, f"{files.body_boxes}[{frames_dir!r}]")
    return ClipSpec(
        video_id=frames_dir,
        frames_path=str(folder),
        frame_files=frame_files,
        label=label - 1,
        source=source,
        line=line,
        face_boxes=faces,
        body_box=body,
        files=files,
    )


def read_boxes(manual_dir: epath.Path, files: LayoutFiles = LayoutFiles()) -> tuple[dict, dict]:
    return _read_json(manual_dir / files.face_boxes), _read_json(manual_dir / files.body_boxes)


def carve_validation(clips: list[ClipSpec], fraction: float, seed: int):
    """Stratified split of `clips` into (train, validation) with a fixed seed.

    Every class gives round(n_c * fraction) clips (at least one when it has two or more), picked
    by a seeded shuffle of the clips sorted by video_id, so the result does not depend on the
    order of the annotation file.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[ClipSpec]] = collections.defaultdict(list)
    for c in sorted(clips, key=lambda c: c.video_id):
        by_class[c.label].append(c)
    val_ids = set()
    for label in sorted(by_class):
        members = by_class[label]
        n = round(len(members) * fraction)
        if n == 0 and len(members) >= 2:
            n = 1
        n = min(n, len(members) - 1)
        order = list(range(len(members)))
        rng.shuffle(order)
        val_ids.update(members[i].video_id for i in order[:n])
    train = [c for c in clips if c.video_id not in val_ids]
    val = [c for c in clips if c.video_id in val_ids]
    return train, val


def statistics(
    examples_meta: Sequence[dict[str, Any]], class_names: Sequence[str]
) -> dict[str, Any]:
    """Per-split figures printed at the end of a build and kept in the dataset metadata."""
    n = len(examples_meta)
    frames = np.array([m["num_frames"] for m in examples_meta] or [0])
    counts = collections.Counter(m["label"] for m in examples_meta)
    return {
        "num_clips": n,
        "class_counts": {name: counts.get(i, 0) for i, name in enumerate(class_names)},
        "frames_stored": int(frames.sum()),
        "frames_per_clip": {
            "min": int(frames.min()),
            "mean": round(float(frames.mean()), 2),
            "max": int(frames.max()),
        },
        "frames_without_face_box": int(sum(m["missing_faces"] for m in examples_meta)),
        "clips_without_body_box": int(sum(not m["has_body"] for m in examples_meta)),
        "bytes_stored": int(sum(m["bytes"] for m in examples_meta)),
    }
