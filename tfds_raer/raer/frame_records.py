"""The record layout of a RAER build: one record per frame, clips in order, a clip table.

A training clip uses 16 of its 100-300 frames. With one record per clip, every clip read had to
read, decompress and parse all of them (4-12 MB at 224 px): the largest single cost of the input
pipeline. So every frame is its own record (its face and context crops and the clip's label and
id), the frames of a clip are consecutive and in order, and the dataset's metadata holds a table
of the clips in record order (video_id, label, num_frames per split). Clip i's frames are records
[first_i, first_i + num_frames_i), first_i being the sum of the earlier clips' num_frames.

Order comes from the TFDS writer: with `disable_shuffling` it sorts examples by their integer
key. `frame_examples` spreads the clips' keys over TFDS's whole 128-bit key range, so that its
on-disk pre-sort buckets (1000, chosen by key range) each hold a few clips and a build never has
to sort a whole split in memory.

Readers: caer_jax/data/clips.py (random access to clips), and the TFDS builders that write this
layout (the RAER builder, the tests' fixtures) use `features`, `frame_examples` and `ClipTable`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

METADATA_KEY = "clips"  # dataset metadata: {split: ClipTable.to_json()}
_KEY_SPACE = 2**128  # TFDS's key range (its shuffler stores 128-bit keys)


def features(
    face_shape: tuple, context_shape: tuple, encoding_format: str, class_names: Sequence[str]
) -> tfds.features.FeaturesDict:
    """The features of one frame record."""
    return tfds.features.FeaturesDict(
        {
            "video_id": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(class_names)),
            "num_frames": tfds.features.Scalar(dtype=np.int32),  # of the clip
            "frame_index": tfds.features.Scalar(dtype=np.int32),  # within the clip, from 0
            "face": tfds.features.Image(shape=face_shape, encoding_format=encoding_format),
            "context": tfds.features.Image(shape=context_shape, encoding_format=encoding_format),
            "face_box_found": tfds.features.Scalar(dtype=np.bool_),
            "annotation": tfds.features.Text(),  # the clip's annotation file and line
        }
    )


def frame_examples(
    position: int, num_clips: int, clip: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(key, example) of every frame of `clip`, the clip at `position` of a split of `num_clips`.

    `clip` has video_id, label, annotation and the per-frame lists face, context and
    face_box_found (encoded crops, booleans), all of the same length.
    """
    n = len(clip["face"])
    if not (len(clip["context"]) == len(clip["face_box_found"]) == n > 0):
        raise ValueError(
            f"clip {clip['video_id']}: {n} face, {len(clip['context'])} context crops and "
            f"{len(clip['face_box_found'])} face_box_found values; expected the same number > 0"
        )
    stride = _KEY_SPACE // max(1, num_clips)
    if n > stride:
        raise ValueError(f"clip {clip['video_id']}: {n} frames do not fit its key range")
    for t in range(n):
        yield (
            position * stride + t,
            {
                "video_id": clip["video_id"],
                "label": clip["label"],
                "num_frames": n,
                "frame_index": t,
                "face": clip["face"][t],
                "context": clip["context"][t],
                "face_box_found": clip["face_box_found"][t],
                "annotation": clip["annotation"],
            },
        )


@dataclasses.dataclass(frozen=True)
class ClipTable:
    """A split's clips in record order."""

    video_ids: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    num_frames: tuple[int, ...] = ()

    @classmethod
    def of_clips(cls, rows: Iterable[tuple[str, int, int]]) -> ClipTable:
        """The table of (video_id, label, num_frames) rows, one per clip in record order."""
        rows = list(rows)
        return cls(*(tuple(column) for column in zip(*rows, strict=True))) if rows else cls()

    def __len__(self) -> int:
        return len(self.video_ids)

    @functools.cached_property  # a frozen dataclass's __dict__ can still cache it
    def first_frames(self) -> np.ndarray:
        """The record index of every clip's first frame."""
        return np.cumsum((0,) + self.num_frames[:-1], dtype=np.int64)[: len(self)]

    def locate(self, record: int) -> tuple[int, int]:
        """(clip position, frame index) of record `record` of the split."""
        clip = int(np.searchsorted(self.first_frames, record, side="right")) - 1
        return clip, record - int(self.first_frames[clip])

    @property
    def total_frames(self) -> int:
        return int(sum(self.num_frames))

    def to_json(self) -> dict[str, list]:
        return {
            "video_id": list(self.video_ids),
            "label": list(self.labels),
            "num_frames": list(self.num_frames),
        }

    @classmethod
    def from_json(cls, value: dict[str, list]) -> ClipTable:
        return cls(tuple(value["video_id"]), tuple(value["label"]), tuple(value["num_frames"]))
