"""What each storage encoding of the RAER builder costs and loses, down to the input pipeline:
`python -m caer_jax.bench --storage` (needs scikit-image, the test extra).

For real photographs (scikit-image's) scaled to frame sizes: the error of each encoding against
the source crop, bytes per crop, encode/decode times, build rate and the pipeline's read rate,
and the cost of keeping the face crop at its source size; and the error of a face of colourful
detail per JPEG chroma subsampling.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from caer_jax.data import augment, clips, pipeline
from tfds_raer.raer import raer_lib
from tfds_raer.raer.benchmark import build_rate

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
FRAME_SIZES = ((1280, 720), (640, 480))
# (format, quality, chroma subsampling)
ENCODINGS = (
    *(("jpeg", q, "4:2:0") for q in (75, 85, 90, 95, 100)),
    *(("jpeg", q, "4:4:4") for q in (90, 95)),
    ("png", 0, ""),
)


def photo_clips(num_frames: int) -> list[tuple[str, list[Image.Image]]]:
    """(name, frames) per photo and frame size; each frame is the photo shifted by a few pixels,
    so that frames differ as in a video."""
    import skimage.data  # the test extra; only this benchmark needs it

    out = []
    for photo in PHOTOS:
        base = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
        for w, h in FRAME_SIZES:
            pixels = np.asarray(base.resize((w, h), Image.BILINEAR))
            frames = [
                Image.fromarray(np.roll(pixels, (t, -2 * t), axis=(0, 1)))
                for t in range(num_frames)
            ]
            out.append((f"{photo}_{w}x{h}", frames))
    return out


def face_box(width: int, height: int) -> list[float]:
    """A face of a fifth of the frame height, upper middle (classroom-camera framing)."""
    return [0.45 * width, 0.2 * height, 0.45 * width + 0.2 * height, 0.4 * height]


def _per_call_ms(fn, items: list, repeat: int = 5) -> float:
    """ms per call of fn over items: the best of `repeat` passes (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return round(1e3 * best / len(items), 2)


def _name(image_format: str, quality: int, subsampling: str) -> str:
    return f"jpeg{quality} {subsampling}" if image_format == "jpeg" else image_format


def encoding_figures(image_size: int = 224) -> list[dict[str, Any]]:
    """Per encoding: mean and max |decoded - source crop| (levels of 255), kB, encode and decode
    ms per crop, for face crops (source size) and context crops (letterboxed) of photo frames."""
    crops: dict[str, list[Image.Image]] = {"face": [], "context": []}
    for _, frames in photo_clips(1):
        crops["face"].append(raer_lib.crop_face(frames[0], face_box(*frames[0].size)))
        crops["context"].append(raer_lib.crop_context(frames[0], None, image_size))
    rows = []
    for image_format, quality, subsampling in ENCODINGS:
        storage = raer_lib.Storage(image_size, image_format, quality or 95, subsampling or "4:4:4")
        row: dict[str, Any] = {"encoding": _name(image_format, quality, subsampling)}
        for stream, images in crops.items():
            blobs = [storage.encode(im) for im in images]
            errors = [
                np.abs(np.asarray(augment.decode_image(b), np.float32) - np.asarray(im))
                for b, im in zip(blobs, images, strict=True)
            ]
            row[stream] = {
                "mean_abs_err": round(float(np.mean([e.mean() for e in errors])), 2),
                "max_abs_err": int(max(e.max() for e in errors)),
                "kB": round(float(np.mean([len(b) for b in blobs])) / 1e3, 1),
                "encode_ms": _per_call_ms(storage.encode, images),
                "decode_ms": _per_call_ms(augment.decode_image, blobs),
            }
        rows.append(row)
    return rows


def colour_detail_error(quality: int = 95) -> dict[str, float]:
    """Mean |decoded - source| of a face crop (levels of 255) per JPEG chroma subsampling, on a
    640x480 frame of 10-pixel blocks of random colour plus noise: where 4:2:0 chroma loses most."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (48, 64, 3)).repeat(10, 0).repeat(10, 1)
    frame = Image.fromarray(
        np.clip(blocks + rng.normal(0, 8, blocks.shape), 0, 255).astype(np.uint8)
    )
    face = raer_lib.crop_face(frame, face_box(640, 480))
    out = {}
    for subsampling in raer_lib.JPEG_SUBSAMPLINGS:
        blob = raer_lib.encode_image(face, "jpeg", quality, subsampling)
        error = np.abs(np.asarray(augment.decode_image(blob), np.float32) - np.asarray(face))
        out[subsampling] = round(float(error.mean()), 1)
    return out


def face_size_cost(image_size: int = 224, num_segments: int = 16) -> dict[str, Any]:
    """Face crops stored at their source size (the authors' order: rotate, then resize) against
    crops resized to image_size at build time: kB per stored face (JPEG 95) and the pipeline's
    ms per clip of num_segments faces (decode, rotate, resize, flip)."""
    storage = raer_lib.Storage(image_size, "jpeg", 95)
    draw = augment.Draw(angle=3.0, flip=True)
    stored: dict[str, list[list[bytes]]] = {"source_size": [], "resized_at_build": []}
    for _, frames in photo_clips(num_segments):
        faces = [raer_lib.crop_face(f, face_box(*f.size)) for f in frames]
        stored["source_size"].append([storage.encode(f) for f in faces])
        resized = [f.resize((image_size, image_size), Image.BILINEAR) for f in faces]
        stored["resized_at_build"].append([storage.encode(f) for f in resized])

    def load(clip: list[bytes]) -> np.ndarray:
        return augment.transform_frames_uint8(
            [augment.decode_image(b) for b in clip], image_size, draw
        )

    return {
        name: {
            "kB_per_face": round(float(np.mean([len(b) for c in encoded for b in c])) / 1e3, 1),
            "ms_per_clip": _per_call_ms(load, encoded),
        }
        for name, encoded in stored.items()
    }


def storage_rates(image_size: int = 224, num_frames: int = 16) -> list[dict[str, Any]]:
    """Build rate (one worker thread) and read rate (train clips/s through the pipeline's loader,
    every frame of the clip) of every encoding, on photo clips saved as JPEG 95 source frames."""
    root = Path(tempfile.mkdtemp(prefix="raer_storage_"))
    try:
        manual = root / "manual"
        lines, faces = [], {}
        for k, (name, frames) in enumerate(photo_clips(num_frames)):
            folder = manual / "clips" / name
            folder.mkdir(parents=True)
            faces[f"clips/{name}"] = {
                f"{t:06d}.jpg": face_box(*frame.size) for t, frame in enumerate(frames)
            }
            for t, frame in enumerate(frames):
                frame.save(folder / f"{t:06d}.jpg", quality=95)
            lines.append(f"clips/{name} {num_frames} {k % 5 + 1}")
        (manual / "train.txt").write_text("\n".join(lines[2:]) + "\n")
        (manual / "test.txt").write_text("\n".join(lines[:2]) + "\n")
        (manual / "face_boxes.json").write_text(json.dumps(faces))
        (manual / "body_boxes.json").write_text("{}")
        loader = pipeline.ClipLoader(num_frames, 1, image_size, 4.0, 0.5)
        rows = []
        for image_format, quality, subsampling in ENCODINGS:
            name = _name(image_format, quality, subsampling)
            data_dir = root / name.replace(" ", "_").replace(":", "")
            build = build_rate(
                manual,
                config=f"{image_size}px",
                num_workers=1,
                data_dir=data_dir,
                image_format=image_format,
                jpeg_quality=quality or 95,
                jpeg_subsampling=subsampling or "4:4:4",
                quiet=True,
            )
            source = clips.ClipSource.open(f"raer/{image_size}px", "train", str(data_dir))
            ms = _per_call_ms(
                lambda i, source=source: loader.load(source[i], i, np.random.default_rng(i)),
                range(len(source)),
            )
            rows.append(
                {
                    "encoding": name,
                    "build_frames_per_s": build["frames_per_s"],
                    "train_ms_per_clip": ms,
                }
            )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def figures() -> dict[str, Any]:
    """Every figure of this module (minutes on a CPU)."""
    return {
        "encodings": encoding_figures(),
        "colour_detail_face_error": colour_detail_error(),
        "face_size": face_size_cost(),
        "rates": storage_rates(),
    }
