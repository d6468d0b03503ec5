"""RAER (ICCV 2025 CLIP-CAER): academic emotion video clips, face and context crops per frame.

  tfds build tfds_raer/raer --manual_dir=/data/RAER --data_dir=D --config=64px
  tfds build raer/64px/skip_bad_clips=True,max_frames=64 --imports=tfds_raer --manual_dir=...

or from Python (`import tfds_raer` registers "raer"):

  tfds.builder("raer/64px", data_dir=D).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=M))

Options that are not part of the config name are builder keyword arguments (also accepted as
`tfds.builder(..., skip_bad_clips=True)` and as `raer/64px/opt=value,...` names), or fields of a
config of its own that `tfds build` takes as JSON, any option included (path_prefix_map too):

  tfds build tfds_raer/raer --manual_dir=/data/RAER --config='{"name": "224px_authors_paths",
      "image_size": 224, "path_prefix_map": [["/home/authors/RAER/", "/data/RAER/"]]}'

(TFDS refuses to give such a config the name of one of BUILDER_CONFIGS: it is another dataset,
read as `raer/224px_authors_paths`; a name "<S>px..." must say its image_size.) See RaerConfig.
The options are stored in the dataset metadata ("build_options"). The data directory depends
only on the config name and version: a build with a validation split replaces one without.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds
from absl import app
from etils import epath

from caer_jax import errors, label_sets
from tfds_raer.raer import frame_records, raer_lib

# `tfds build` runs the builder under absl's app.run, which would print a user's mistake (a
# missing manual_dir, a bad annotation line, an unreadable frame) as a traceback: one `error:`
# line and exit status 2 instead, as caer_jax's own commands do.
app.install_exception_handler(errors.ExitOnUserError())

_DESCRIPTION = """
RAER: about 2,700 video clips of about 140 students in classrooms, libraries, laboratories and
dormitories, labelled with one of five academic emotions (Neutrality, Enjoyment, Confusion,
Fatigue, Distraction) or the classes of another label set. Each example is one frame of a clip:
its face crop at its source size (face box grown by 20 px, whole frame without a box) and its
context crop (body box, whole frame without one, letterboxed to SxS with OpenCV as the authors),
as JPEG or PNG, with the clip's video_id, 0-based label and num_frames and the frame's index. The
frames of a clip are consecutive records, in order; the metadata ("clips") lists every split's
clips in record order.
"""

_CITATION = """
@inproceedings{zhao2025caer,
  title = {Context-Aware Academic Emotion Dataset and Benchmark},
  author = {Zhao and others},
  booktitle = {ICCV},
  year = {2025},
  note = {arXiv:2507.00586}
}
"""

OPTION_FIELDS = (
    "skip_bad_clips",
    "train_file",
    "test_file",
    "face_boxes_file",
    "body_boxes_file",
    "validation_fraction",
    "validation_seed",
    "max_frames",
    "image_format",
    "jpeg_quality",
    "jpeg_subsampling",
    "label_set",
    "path_prefix_map",
    "num_workers",
)


@dataclasses.dataclass(kw_only=True)
class RaerConfig(tfds.core.BuilderConfig):
    """Crop size S (name f"{S}px") and the build options (see the module docstring).

    skip_bad_clips: leave out bad clips (counted by reason, reported, kept in the metadata)
      instead of failing on the first one.
    validation_fraction: > 0 carves a stratified "validation" split from train (seeded).
    max_frames: > 0 stores at most that many frames per clip, subsampled uniformly.
    path_prefix_map: ((old, new), ...) rewrites absolute frames_dir prefixes (first match), e.g.
      (("/home/authors/RAER/", "/data/RAER/"),) when the annotation files name the authors' paths.
    train_file, test_file, face_boxes_file, body_boxes_file: file names inside manual_dir.
    num_workers: threads decoding and cropping clips (1 = in the writing thread; 0 = automatic:
      one per core, at most 8). The records do not depend on it.
    image_format, jpeg_quality, jpeg_subsampling: how crops are stored, "jpeg" (at jpeg_quality,
      chroma "4:4:4" or "4:2:0") or "png" (lossless). The default, JPEG 95 with full-resolution
      chroma (4:4:4), is chosen from the figures in README.md.
    label_set: the classes of the annotation files (caer_jax.label_sets): "raer5" or the path of a
      label set JSON file. Labels must lie in 1..n; the ClassLabel names are the set's.
    """

    image_size: int = 224
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    jpeg_subsampling: str = "4:4:4"
    label_set: str = label_sets.RAER5.name
    skip_bad_clips: bool = False
    validation_fraction: float = 0.0
    validation_seed: int = 0
    max_frames: int = 0
    path_prefix_map: tuple[tuple[str, str], ...] = ()
    num_workers: int = 0
    train_file: str = raer_lib.ANNOTATION_FILES["train"]
    test_file: str = raer_lib.ANNOTATION_FILES["test"]
    face_boxes_file: str = raer_lib.FACE_BOXES_FILE
    body_boxes_file: str = raer_lib.BODY_BOXES_FILE

    def __post_init__(self) -> None:
        # A JSON config (`tfds build --config='{...}'`) gives lists; the options hold tuples.
        self.path_prefix_map = tuple(tuple(pair) for pair in self.path_prefix_map)

    @property
    def files(self) -> raer_lib.LayoutFiles:
        return raer_lib.LayoutFiles(
            self.train_file, self.test_file, self.face_boxes_file, self.body_boxes_file
        )


def _make_config(size: int, description: str) -> RaerConfig:
    return RaerConfig(name=f"{size}px", image_size=size, description=description)


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for RAER (manual download)."""

    name = "raer"
    VERSION = tfds.core.Version("3.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Face and context crops per frame, JPEG, ArrayRecord by default.",
        "2.0.0": "Face crops at their source size (the pipeline rotates, then resizes, as the "
        "authors); context letterboxed with OpenCV as the authors; JPEG quality 95 by default "
        "or PNG (image_format); class names from the label set (label_set); frames stored as "
        "Sequence(Image) features (same records as Video), readable without TensorFlow.",
        "3.0.0": "One record per frame, the frames of a clip consecutive and in order, and a "
        "table of the clips in the metadata: a reader reads the frames it samples, not the "
        "whole clip (tfds_raer/raer/frame_records.py).",
        "3.1.0": "JPEG crops keep full-resolution chroma (4:4:4; was Pillow's 4:2:0): a third "
        "less error on the context crops of photographs, 3x less on colourful detail, for a "
        "quarter to a third more bytes (jpeg_subsampling; README.md, Storage).",
    }

    BUILDER_CONFIGS = [
        _make_config(224, "224x224 crops, the paper's setting."),
        _make_config(64, "64x64 crops, for the tiny embedded default."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "224px"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    RAER is distributed on request by its authors (see https://github.com/zgsfer/CLIP-CAER).
    Put these in manual_dir (`--manual_dir=DIR` of `tfds build`, or
    `tfds.download.DownloadConfig(manual_dir=DIR)`):
      {raer_lib.ANNOTATION_FILES["train"]}   lines "<frames_dir> <num_frames> <label 1..n>" (n = 5 for RAER)
      {raer_lib.ANNOTATION_FILES["test"]}    same format
      {raer_lib.FACE_BOXES_FILE}  {{frames_dir: {{frame_file_name: [left, upper, right, lower]}}}}
      {raer_lib.BODY_BOXES_FILE}  {{frames_dir: [left, upper, right, lower]}}
      <frames_dir>/     one folder of frame images per clip (jpg/png/...), sorted by file name;
                        frames_dir relative to manual_dir, or absolute (see path_prefix_map)
    `python -m caer_jax.data.synthetic --out DIR --clips 600` writes a synthetic stand-in.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10's own lookup needs the `importlib_resources` backport on Python >= 3.9,
        # which it does not declare; this file's path is what it would find.
        return epath.Path(__file__)

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        self._init_kwargs = dict(kwargs, file_format=file_format)  # what a pickle recreates
        self._overrides = {k: kwargs.pop(k) for k in OPTION_FIELDS if k in kwargs}  # read by _info
        super().__init__(file_format=file_format, **kwargs)
        # Bad options and label sets fail here, also when a built dataset is only read.
        _ = self.label_set
        if file_format is None and not self.is_prepared():
            self.info.set_file_format("array_record", override=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"init_kwargs": self._init_kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["init_kwargs"])

    @functools.cached_property
    def options(self) -> RaerConfig:
        """The config with the options given to this builder (checked)."""
        options = dataclasses.replace(self.builder_config, **self._overrides)
        _check_options(options)
        return options

    @functools.cached_property
    def label_set(self) -> label_sets.LabelSet:
        return label_sets.load(self.options.label_set)

    def _info(self) -> tfds.core.DatasetInfo:
        if tfds.core.dataset_info.dataset_info_path(self.data_path).exists():
            # A built dataset: its own features (class names, image format), whatever the
            # options given to read it.
            features = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
        else:
            features = self._features()
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=features,
            supervised_keys=None,
            homepage="https://github.com/zgsfer/CLIP-CAER",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
            # Records in key order (frame_records.frame_examples): a clip's frames consecutive.
            disable_shuffling=True,
        )

    def _features(self) -> tfds.features.FeaturesDict:
        s = self.builder_config.image_size
        # Face crops keep their source size, which varies from frame to frame; the context is
        # letterboxed to SxS. Frames are Image features (not Video, which needs TensorFlow merely
        # to be constructed, and every reader constructs the features).
        return frame_records.features(
            (None, None, 3), (s, s, 3), self.options.image_format, self.label_set.class_names
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = epath.Path(dl_manager.manual_dir)
        except AssertionError as e:  # TFDS raises AssertionError when the folder is missing
            raise raer_lib.RaerFormatError(f"RAER manual_dir missing: {e}") from None
        if not manual_dir.is_dir():
            raise raer_lib.RaerFormatError(
                f"RAER manual_dir {manual_dir} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        opts = self.options
        label_sets.check_same_classes(
            self.label_set.class_names,
            f"label set {opts.label_set!r}",
            self.info.features["label"].names,
            f"the dataset already in {self.data_dir} (delete it to rebuild)",
        )
        face_boxes, body_boxes = raer_lib.read_boxes(manual_dir, opts.files)
        seen: dict[str, str] = {}
        self._problems = {}
        self._stats = {}
        clips = {}
        for split, file_name in opts.files.splits.items():
            problems = raer_lib.Problems()
            clips[split] = raer_lib.read_split(
                manual_dir,
                file_name,
                face_boxes=face_boxes,
                body_boxes=body_boxes,
                seen=seen,
                num_classes=self.label_set.num_classes,
                skip_bad_clips=opts.skip_bad_clips,
                problems=problems,
                prefix_map=opts.path_prefix_map,
                files=opts.files,
            )
            self._problems[split] = problems
        if opts.validation_fraction > 0:
            clips["train"], clips["validation"] = raer_lib.carve_validation(
                clips["train"], opts.validation_fraction, opts.validation_seed
            )
            self._problems["validation"] = raer_lib.Problems()
        self.info.metadata["build_options"] = _options_dict(opts)
        return {split: self._generate_examples(split, c) for split, c in clips.items()}

    def _generate_examples(self, split: str, clips: list[raer_lib.ClipSpec]) -> Iterator:
        opts = self.options
        problems = self._problems[split]
        meta, written = [], []  # written: (video_id, label, num_frames) of each clip
        start = time.perf_counter()
        workers = _num_workers(opts.num_workers)
        for position, (clip, result) in enumerate(_encode_in_order(clips, opts, workers)):
            if isinstance(result, tuple):  # (reason, message) of a bad clip
                reason, problem = result
                message = f"{clip.source}: {clip.video_id}: {problem}"
                if not opts.skip_bad_clips:
                    raise raer_lib.RaerFormatError(message)
                problems.add(reason, message)
                continue
            meta.append(
                {
                    "label": clip.label,
                    "num_frames": result["num_frames"],
                    "missing_faces": result["face_box_found"].count(False),
                    "has_body": clip.body_box is not None,
                    "bytes": sum(map(len, result["face"])) + sum(map(len, result["context"])),
                }
            )
            written.append((clip.video_id, clip.label, result["num_frames"]))
            yield from frame_records.frame_examples(position, len(clips), result)
        if not meta:
            raise raer_lib.RaerFormatError(
                f"{split} split: no usable clip ({problems.total} skipped: "
                f"{dict(problems.counts)}); first: " + "; ".join(problems.first[:3])
            )
        stats = raer_lib.statistics(meta, self.label_set.class_names)
        stats["seconds"] = round(time.perf_counter() - start, 2)
        stats["skipped"] = problems.as_dict()
        self._stats[split] = stats
        self.info.metadata.setdefault("statistics", {})[split] = stats
        table = frame_records.ClipTable.of_clips(written)
        self.info.metadata.setdefault(frame_records.METADATA_KEY, {})[split] = table.to_json()
        _report(self.name, self.builder_config.name, split, stats)


def _check_options(o: RaerConfig) -> None:
    def bad(msg):
        raise errors.BadInputError(f"raer builder option: {msg}")

    if not 8 <= o.image_size <= 4096:
        bad(f"image_size must be in 8..4096, got {o.image_size}")
    named = re.match(r"(\d+)px", o.name)
    if named and int(named.group(1)) != o.image_size:
        bad(f"config {o.name!r} has image_size {o.image_size}; give the size its name says")
    if o.image_format not in raer_lib.IMAGE_FORMATS:
        bad(f"image_format must be one of {raer_lib.IMAGE_FORMATS}, got {o.image_format!r}")
    if not 1 <= o.jpeg_quality <= 100:
        bad(f"jpeg_quality must be in 1..100, got {o.jpeg_quality}")
    if o.jpeg_subsampling not in raer_lib.JPEG_SUBSAMPLINGS:
        bad(
            f"jpeg_subsampling must be one of {raer_lib.JPEG_SUBSAMPLINGS}, got {o.jpeg_subsampling!r}"
        )
    if not 0.0 <= o.validation_fraction < 1.0:
        bad(f"validation_fraction must be in [0, 1), got {o.validation_fraction}")
    if o.max_frames < 0:
        bad(f"max_frames must be >= 0 (0 = all), got {o.max_frames}")
    if o.num_workers < 0:
        bad(f"num_workers must be >= 0 (0 = automatic), got {o.num_workers}")
    for pair in o.path_prefix_map:
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            bad(f"path_prefix_map entries must be (old_prefix, new_prefix) strings, got {pair!r}")


def _options_dict(o: RaerConfig) -> dict[str, Any]:
    d = {k: getattr(o, k) for k in OPTION_FIELDS}
    d["path_prefix_map"] = [list(p) for p in o.path_prefix_map]
    d["image_size"] = o.image_size
    return d


_CLIPS_AHEAD = 2  # clips whose frames are queued beyond the one being written


def _encode_in_order(
    clips: list[raer_lib.ClipSpec], opts: RaerConfig, num_workers: int
) -> Iterator[tuple[raer_lib.ClipSpec, Any]]:
    """(clip, raer_lib.finish_clip result) in order; frames cropped by `num_workers` threads.

    Threads, not processes: on RAER-like frames (640x480 JPEG in, two 224 px JPEGs out) nearly
    all the time is Pillow's JPEG decoder, resampler and JPEG encoder, which release the GIL
    (ImagingSectionEnter in Pillow's decode.c, encode.c and Resample.c), so threads keep every
    core busy without what processes cost: interpreter start-up and a TF/TFDS import per worker,
    pickling crops back (spawned processes were slower than one process on 2 cores: 600 small
    clips 15 s vs 9.7 s). The tasks are frames, not clips, so the last clips of a split (or a
    split of a few clips) still use every core. Frames of at most `_CLIPS_AHEAD` clips are
    submitted ahead of the one being written, so memory stays bounded; a consumer that stops
    early cancels the frames not yet started.
    """
    storage = raer_lib.Storage(
        opts.image_size, opts.image_format, opts.jpeg_quality, opts.jpeg_subsampling
    )
    start = functools.partial(raer_lib.start_clip, storage=storage, max_frames=opts.max_frames)
    if num_workers <= 1:
        for clip in clips:
            yield clip, raer_lib.finish_clip(clip, start(clip))
        return
    pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="raer_crop")
    try:
        pending: collections.deque = collections.deque()
        for clip in clips:
            pending.append((clip, start(clip, map_fn=pool.map)))  # submits its frames now
            if len(pending) > _CLIPS_AHEAD:
                first, frames = pending.popleft()
                yield first, raer_lib.finish_clip(first, frames)
        while pending:
            first, frames = pending.popleft()
            yield first, raer_lib.finish_clip(first, frames)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _num_workers(requested: int) -> int:
    """0 = automatic: one thread per core available to this process, at most 8."""
    if requested > 0:
        return requested
    return max(1, min(8, raer_lib.available_cores()))


def _report(name: str, config: str, split: str, stats: dict[str, Any]) -> None:
    skipped = stats["skipped"]
    lines = [
        f"[{name}/{config}] {split}: {stats['num_clips']} clips, {stats['frames_stored']} frames, "
        f"{stats['bytes_stored'] / 1e6:.1f} MB of crops in {stats['seconds']} s; classes "
        + json.dumps(stats["class_counts"]),
        f"  frames without a face box: {stats['frames_without_face_box']}, clips without a body "
        f"box: {stats['clips_without_body_box']}",
    ]
    if skipped["total"]:
        lines.append(f"  SKIPPED {skipped['total']} bad clips: " + json.dumps(skipped["by_reason"]))
        lines += [f"    {m}" for m in skipped["first"]]
    print("\n".join(lines), file=sys.stderr, flush=True)
