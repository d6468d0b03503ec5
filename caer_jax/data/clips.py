"""Random access to the clips of a built RAER split, reading only the frames asked for.

A build stores one record per frame, a clip's frames consecutive and in order, and a table of the
clips in its metadata (tfds_raer/raer/frame_records.py). `ClipSource.open(name, split)[i]` is
clip i: its id, label and length from the table, and `read(frames)` reads just those frame
records through `tfds.data_source` (random access to ArrayRecord, no TensorFlow), with the crops
left encoded so that the caller decodes what it uses.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from caer_jax import errors
from tfds_raer.raer import frame_records

STREAMS = ("face", "context")


@dataclasses.dataclass(frozen=True)
class Clip:
    """One clip: what its split's table says, and its frames on demand."""

    video_id: str
    label: int
    num_frames: int
    first_record: int  # of its first frame in `split`
    split: SplitFrames

    def read(self, frames: Sequence[int]) -> dict[str, list]:
        """The encoded face and context crops (bytes) and face_box_found of `frames`, in the
        order asked (repeats allowed)."""
        wanted = sorted({int(t) for t in frames})
        if wanted and not (0 <= wanted[0] and wanted[-1] < self.num_frames):
            raise IndexError(f"{self.video_id}: frames {wanted} of {self.num_frames}")
        # One record at a time: the data source's batched read hands every call to a thread
        # pool, which costs more CPU than the 16-32 small reads of a clip.
        by_frame = {t: self.split.records[self.first_record + t] for t in wanted}
        for t, record in by_frame.items():
            self.split.check(record, self, t)
        return {
            field: [by_frame[int(t)][field] for t in frames]
            for field in (*STREAMS, "face_box_found")
        }

    def read_all(self) -> dict[str, list]:
        return self.read(range(self.num_frames))


@dataclasses.dataclass(frozen=True)
class SplitFrames:
    """The frame records of one split and its clip table."""

    records: Any  # tfds.data_source, crops left encoded
    table: frame_records.ClipTable
    where: str

    def check(self, record: dict, clip: Clip, frame: int) -> None:
        """A frame record must be the frame of the clip the table puts there, with its label
        and length."""
        found = (
            _text(record["video_id"]),
            int(record["frame_index"]),
            int(record["label"]),
            int(record["num_frames"]),
        )
        wanted = (clip.video_id, frame, clip.label, clip.num_frames)
        if found != wanted:
            raise errors.BadInputError(
                f"{self.where}: record {clip.first_record + frame} is frame {found[1]} of "
                f"{found[0]} (label {found[2]}, {found[3]} frames), but the clip table puts frame "
                f"{frame} of {clip.video_id} (label {clip.label}, {clip.num_frames} frames) "
                f"there; the build is damaged: rebuild it"
            )


def open_split(name: str, split: str, data_dir: str | None) -> SplitFrames:
    """The frame records and clip table of one split (a name, no expression)."""
    records = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={stream: tfds.decode.SkipDecoding() for stream in STREAMS},
    )
    info = records.dataset_info
    where = f"{name} {split} split in {info.data_dir}"
    tables = (info.metadata or {}).get(frame_records.METADATA_KEY, {})
    if split not in tables:
        raise errors.BadInputError(
            f"{where}: no clip table in its metadata ({frame_records.METADATA_KEY!r}); it was "
            f"not built with one record per frame (RAER builder >= 3.0.0): rebuild it"
        )
    table = frame_records.ClipTable.from_json(tables[split])
    if table.total_frames != len(records):
        raise errors.BadInputError(
            f"{where}: the clip table in its metadata counts {table.total_frames} frames, the "
            f"records hold {len(records)}; the build is damaged: rebuild it"
        )
    return SplitFrames(records, table, where)


class ClipSource:
    """Clips by index: those of a split, or of a TFDS split expression over clips
    ("train[:10%]+test", percentages and slices counting clips, not frame records)."""

    def __init__(self, clips: list[Clip], dataset_info: tfds.core.DatasetInfo):
        self.clips = clips
        self.dataset_info = dataset_info

    @classmethod
    def open(cls, name: str, split: str, data_dir: str | None = None) -> ClipSource:
        instruction = tfds.core.ReadInstruction.from_spec(split)
        splits: dict[str, SplitFrames] = {}
        for part in split.split("+"):
            base = part.split("[", 1)[0].strip()
            if base not in splits:
                splits[base] = open_split(name, base, data_dir)
        sizes = {
            base: types.SimpleNamespace(num_examples=len(s.table)) for base, s in splits.items()
        }
        clips = []
        for part in instruction.to_absolute(sizes):
            frames = splits[part.splitname]
            t, first = frames.table, frames.table.first_frames
            for i in range(len(t))[part.from_ : part.to]:
                clips.append(
                    Clip(t.video_ids[i], t.labels[i], t.num_frames[i], int(first[i]), frames)
                )
        return cls(clips, next(iter(splits.values())).records.dataset_info)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Clip:
        return self.clips[index]

    @property
    def video_ids(self) -> list[str]:
        return [clip.video_id for clip in self.clips]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
