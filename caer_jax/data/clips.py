"""Random access to the clips of a built RAER split, reading only the frames asked for.

A build stores one record per frame, a clip's frames consecutive and in order, and a table of the
clips in its metadata (tfds_raer/raer/frame_records.py). `ClipSource.open(name, split)[i]` is
clip i: its id, label and length from the table, and `read(frames)` reads just those frame
records through `tfds.data_source` (random access to ArrayRecord, no TensorFlow), with the crops
left encoded so that the caller decodes what it uses (`images(frames)` decodes them).

Damage that storage can do to a build (a shard deleted, cut short, bytes flipped: ArrayRecord's
chunk hash catches those; a stored crop that does not decode) is turned here, where each record
is read and decoded, into one `errors.DamagedDataError` naming the file, the record, its clip and
frame, and what to do; also inside grain's worker processes, which hand the error back whole.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from caer_jax import errors
from caer_jax.data import augment
from tfds_raer.raer import frame_records

STREAMS = ("face", "context")
# What ArrayRecord's reader raises for a file it cannot open (missing, cut short) or a record it
# cannot read back (a chunk whose hash does not match): riegeli's status, as RuntimeError.
READ_ERRORS = (RuntimeError, OSError)


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
        by_frame = {t: self.split.record(self.first_record + t) for t in wanted}
        for t, record in by_frame.items():
            self.split.check(record, self, t)
        return {
            field: [by_frame[int(t)][field] for t in frames]
            for field in (*STREAMS, "face_box_found")
        }

    def read_all(self) -> dict[str, list]:
        return self.read(range(self.num_frames))

    def images(self, frames: Sequence[int]) -> dict[str, list[Image.Image]]:
        """The face and context crops of `frames` decoded (RGB), in the order asked."""
        encoded = self.read(frames)
        return {
            stream: [
                self._decode(data, stream, t)
                for data, t in zip(encoded[stream], frames, strict=True)
            ]
            for stream in STREAMS
        }

    def _decode(self, data: bytes, stream: str, frame: int) -> Image.Image:
        try:
            return augment.decode_image(data)
        except augment.DECODE_ERRORS as e:
            problem = f"holds a {stream} crop that does not decode ({errors.one_line(e)})"
            raise self.split.damaged(self.first_record + int(frame), problem) from e


@dataclasses.dataclass(frozen=True)
class SplitFrames:
    """The frame records of one split and its clip table."""

    records: Any  # tfds.data_source, crops left encoded
    table: frame_records.ClipTable
    where: str  # "<name> <split> split in <folder>"
    directory: str  # the build's version folder
    files: tuple[tuple[str, int], ...]  # (path, records) of every shard, in record order

    def clip(self, position: int) -> Clip:
        """The clip at `position` of the table."""
        t = self.table
        first = int(t.first_frames[position])
        return Clip(t.video_ids[position], t.labels[position], t.num_frames[position], first, self)

    def record(self, index: int) -> dict:
        """Frame record `index`; one that cannot be read raises DamagedDataError."""
        try:
            return self.records[index]
        except READ_ERRORS as e:
            raise self.damaged(index, f"cannot be read ({errors.one_line(e)})") from e

    def file_of(self, index: int) -> tuple[str, int]:
        """(shard path, position in it) of record `index`."""
        for path, first, count in self.shards():
            if index < first + count:
                return path, index - first
        raise IndexError(f"record {index} of the {self.where}, which has {len(self.records)}")

    def describe(self, index: int) -> str:
        """Record `index` as a user finds it: its file and place there, its clip and frame."""
        path, position = self.file_of(index)
        clip, frame = self.table.locate(index)
        return (
            f"{path}: record {position} (frame {frame} of clip {self.table.video_ids[clip]}, "
            f"record {index} of the {self.where})"
        )

    @property
    def remedy(self) -> str:
        return (
            f"the build is damaged: restore the file from a copy, or delete {self.directory} and "
            "build the dataset again (`python -m caer_jax.data.check --config=...` lists every "
            "damaged record)"
        )

    def damaged(self, index: int, problem: str) -> errors.DamagedDataError:
        return errors.DamagedDataError(f"{self.describe(index)} {problem}", self.remedy)

    def shards(self) -> list[tuple[str, int, int]]:
        """(path, first record, number of records) of every shard file that holds records."""
        counts = [n for _, n in self.files]
        firsts = np.cumsum([0, *counts[:-1]])
        return [(path, int(a), n) for (path, n), a in zip(self.files, firsts, strict=True) if n]

    def lost_file(self, path: str, first: int, count: int, problem: str) -> errors.DamagedDataError:
        ids, last = self.table.video_ids, first + count - 1
        return errors.DamagedDataError(
            f"{path}: {problem} (it holds records {first} to {last} of the {self.where}, frames "
            f"of clips {ids[self.table.locate(first)[0]]} to {ids[self.table.locate(last)[0]]})",
            self.remedy,
        )

    def check_files(self) -> None:
        """Raises DamagedDataError for a shard that is not there (before any read needs it)."""
        for path, first, count in self.shards():
            if not epath.Path(path).exists():
                raise self.lost_file(path, first, count, "missing")

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
            raise errors.DamagedDataError(
                f"{self.where}: record {clip.first_record + frame} is frame {found[1]} of "
                f"{found[0]} (label {found[2]}, {found[3]} frames), but the clip table puts frame "
                f"{frame} of {clip.video_id} (label {clip.label}, {clip.num_frames} frames) there",
                "the build is damaged: rebuild it",
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
    split_info = info.splits[split]
    files = tuple(zip(map(os.fspath, split_info.filepaths), split_info.shard_lengths, strict=True))
    return SplitFrames(records, table, where, os.fspath(info.data_dir), files)


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
                splits[base].check_files()
        sizes = {
            base: types.SimpleNamespace(num_examples=len(s.table)) for base, s in splits.items()
        }
        clips = []
        for part in instruction.to_absolute(sizes):
            frames = splits[part.splitname]
            clips += [frames.clip(i) for i in range(len(frames.table))[part.from_ : part.to]]
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
