"""Which frames of a clip the model sees: TSN segment sampling, as the reference dataloader.

`train_indices` draws one random frame per segment (TSN), `eval_indices` takes the centre of each
segment; both return segment start offsets, one per segment, exactly as the reference's
`_get_train_indices` / `_get_test_indices`. `frame_indices` expands offsets to the `duration`
consecutive frames read from each (the reference's loading loop, which stops advancing at the
last frame).
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, num_segments: int, duration: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got num_frames={num_frames}")
    if num_segments < 1 or duration < 1:
        raise ValueError(f"num_segments={num_segments} and duration={duration} must be >= 1")


def _edge_pad(num_frames: int, num_segments: int) -> np.ndarray:
    """range(num_frames) padded at the end with its last index to num_segments entries.

    The reference pads with np.pad(..., "edge"), which fails when num_frames > num_segments (only
    reachable with duration > 1); there the first num_segments frames are taken instead.
    """
    offsets = np.arange(min(num_frames, num_segments))
    return np.pad(offsets, (0, num_segments - len(offsets)), mode="edge")


def train_indices(
    num_frames: int, num_segments: int, duration: int, rng: np.random.Generator
) -> np.ndarray:
    """Segment offsets for training: one random start per segment (TSN), int64 [num_segments]."""
    _check(num_frames, num_segments, duration)
    average_duration = (num_frames - duration + 1) // num_segments
    if average_duration > 0:
        return np.arange(num_segments) * average_duration + rng.integers(
            average_duration, size=num_segments
        )
    if num_frames > num_segments:
        # Sorted draws with replacement: a frame may repeat, as with the reference's randint.
        return np.sort(rng.integers(num_frames - duration + 1, size=num_segments))
    return _edge_pad(num_frames, num_segments)


def eval_indices(num_frames: int, num_segments: int, duration: int) -> np.ndarray:
    """Segment offsets for evaluation: the centre of each of num_segments equal segments."""
    _check(num_frames, num_segments, duration)
    if num_frames > num_segments + duration - 1:
        tick = (num_frames - duration + 1) / float(num_segments)
        return np.array([int(tick / 2.0 + tick * i) for i in range(num_segments)], dtype=np.int64)
    return _edge_pad(num_frames, num_segments)


def frame_indices(offsets: np.ndarray, duration: int, num_frames: int) -> np.ndarray:
    """The frames read for `offsets`: `duration` consecutive frames from each, held at the last.

    Returns int64 [len(offsets) * duration], segment-major (the model's time axis).
    """
    frames = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(duration)
    return np.minimum(frames, num_frames - 1).reshape(-1)
