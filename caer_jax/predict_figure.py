"""The PNG `caer_jax.predict` writes per clip: what the model saw, and what it answered.

One column per sampled frame: the frame with the detected face box (solid) and the region the
face crop is cut from (dashed, the box grown by the builder's margin), the face crop and the
letterboxed context as the model receives them; beside them the class probabilities as bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from tfds_raer.raer import raer_lib

_THUMB_INCHES = 1.4  # width of one frame's column
_BAR_INCHES = 3.5
_DPI = 100
_ROWS = ("frame, face box", "face crop", "context")


def _box_patches(box: Sequence[float], width: int, height: int) -> list[matplotlib.patches.Patch]:
    left, upper, right, lower = box
    grown = raer_lib.face_region(box, width, height)
    return [
        matplotlib.patches.Rectangle(
            (left, upper), right - left, lower - upper, fill=False, edgecolor="lime", linewidth=1.5
        ),
        matplotlib.patches.Rectangle(
            (grown[0], grown[1]),
            grown[2] - grown[0],
            grown[3] - grown[1],
            fill=False,
            edgecolor="yellow",
            linewidth=1,
            linestyle="--",
        ),
    ]


def plot_prediction(
    path: str | Path,
    *,
    frames: Sequence[Image.Image],
    frame_indices: Sequence[int],
    boxes: Sequence[Sequence[float] | None],
    face: np.ndarray,
    context: np.ndarray,
    probabilities: Sequence[float],
    class_names: Sequence[str],
    title: str,
    streams: str,
) -> None:
    """Writes the clip's figure to `path` (a PNG). `face` and `context` are the model's inputs
    [T, S, S, 3] (uint8, or float in [0, 1]); `streams` marks the stream the model ignores."""
    num_frames = len(frames)
    if not num_frames == len(frame_indices) == len(boxes) == len(face) == len(context):
        raise ValueError(
            f"{len(frames)} frames, {len(frame_indices)} indices, {len(boxes)} boxes, "
            f"{len(face)} face and {len(context)} context crops: expected one of each per frame"
        )
    # A Figure without pyplot: no backend, no display, nothing to close (files only).
    fig = Figure(
        figsize=(num_frames * _THUMB_INCHES + _BAR_INCHES, 3 * _THUMB_INCHES + 0.9),
        dpi=_DPI,
        layout="constrained",
    )
    grid = fig.add_gridspec(
        3, num_frames + 1, width_ratios=[1] * num_frames + [_BAR_INCHES / _THUMB_INCHES]
    )
    unused = {"face": "context", "context": "face"}.get(streams)
    for t, (frame, index, box) in enumerate(zip(frames, frame_indices, boxes, strict=True)):
        for row, image in enumerate((np.asarray(frame), face[t], context[t])):
            ax = fig.add_subplot(grid[row, t])
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                label = _ROWS[row]
                if unused and label.startswith(unused):
                    label += "\n(unused)"
                ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(
                    f"frame {index}" if box is not None else f"frame {index}\nno face",
                    fontsize=8,
                    color="black" if box is not None else "red",
                )
                if box is not None:
                    for patch in _box_patches(box, *frame.size):
                        ax.add_patch(patch)

    bars = fig.add_subplot(grid[:, num_frames])
    probs = np.asarray(probabilities, dtype=float)
    best = int(probs.argmax())
    colours = ["tab:orange" if k == best else "tab:blue" for k in range(len(probs))]
    positions = np.arange(len(probs))[::-1]  # first class on top
    bars.barh(positions, probs, color=colours)
    bars.set_yticks(positions, class_names, fontsize=9)
    bars.set_xlim(0, 1)
    bars.set_xlabel("probability")
    for y, p in zip(positions, probs, strict=True):
        inside = p > 0.75  # a long bar holds its own label
        bars.text(
            p - 0.02 if inside else p + 0.02,
            y,
            f"{p:.3f}",
            va="center",
            ha="right" if inside else "left",
            color="white" if inside else "black",
            fontsize=8,
        )
    fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
