"""Frame transforms of the reference (video_transform.py): rotation, resize, flip, [0, 1] pixels.

Train: one random draw per clip and stream (every frame of the stream shares it): rotation by a
uniform angle in [-rotation_degrees, rotation_degrees] (PIL rotate, nearest neighbour as
torchvision's RandomRotation default, black fill, size kept), resize to image_size x image_size
(bilinear, aspect not kept), horizontal flip with probability flip_prob. Eval: resize only.
Pixels are divided by 255; no mean/std normalisation.

As the authors, the face crop reaches the rotation at its source size (the builder stores it so)
and is resized after it; the context crop is stored letterboxed at the builder's size, so its
resize is the identity unless a dataset of another size is read (PIL returns a copy then).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Draw:
    """The random parameters shared by all frames of one stream of one clip."""

    angle: float = 0.0  # degrees, counter-clockwise (PIL convention)
    flip: bool = False


IDENTITY = Draw()

# Every decoded, rotated, resized and flipped frame is a new Pillow image, whose memory block
# Pillow frees at once unless told to keep some for reuse (it keeps none by default). Under
# jemalloc (launch/with_jemalloc.sh, which training on CPU uses) a fresh block made each JPEG
# decode of a 224 px crop 40 % slower (0.34 -> 0.48 ms); keeping 64, about a clip's frames and
# their intermediates, brings it back to glibc's speed. They hold a few MB per process (64
# frame-sized blocks at most). A larger PILLOW_BLOCKS_MAX in the environment is kept.
_PILLOW_BLOCKS_KEPT = 64
if Image.core.get_blocks_max() < _PILLOW_BLOCKS_KEPT:
    Image.core.set_blocks_max(_PILLOW_BLOCKS_KEPT)


def random_draw(rng: np.random.Generator, rotation_degrees: float, flip_prob: float) -> Draw:
    """One draw: angle ~ U[-rotation_degrees, rotation_degrees], flip ~ Bernoulli(flip_prob)."""
    angle = float(rng.uniform(-rotation_degrees, rotation_degrees))
    flip = bool(rng.random() < flip_prob)
    return Draw(angle=angle, flip=flip)


# What Pillow raises for bytes it cannot decode as an image (unknown format, cut short, corrupt).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_image(data: bytes) -> Image.Image:
    """A stored crop (JPEG or PNG bytes) as an RGB image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    # Stored crops are RGB already; convert() would copy every frame for nothing.
    return image if image.mode == "RGB" else image.convert("RGB")


def transform_frames_uint8(
    frames: Sequence[Image.Image | np.ndarray], image_size: int, draw: Draw = IDENTITY
) -> np.ndarray:
    """Rotates, resizes and flips every frame with the same `draw`: uint8 [T, S, S, 3]."""
    out = np.empty((len(frames), image_size, image_size, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
        if draw.angle != 0.0:
            image = image.rotate(draw.angle, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        if draw.flip:  # PIL's mirror: the same pixels as [:, ::-1], 4x faster than numpy's copy
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[t] = np.asarray(image, dtype=np.uint8)
    return out


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], divided by 255 as torchvision's ToTensor."""
    return np.divide(pixels, np.float32(255.0), dtype=np.float32)


def transform_frames(
    frames: Sequence[Image.Image | np.ndarray], image_size: int, draw: Draw = IDENTITY
) -> np.ndarray:
    """As transform_frames_uint8, in float32 [T, S, S, 3] in [0, 1]."""
    return to_unit_range(transform_frames_uint8(frames, image_size, draw))
