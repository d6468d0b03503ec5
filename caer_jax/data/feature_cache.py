"""Per-frame features of the frozen CLIP image encoder, computed once per split and stream.

With config.model.freeze_image_encoder the encoder's output is a function of the stored frames
alone, so it is run once over every stored frame (both streams, and with `flipped` every frame
mirrored too) and training reads features instead of pixels: the same TSN frames and flips
(`pipeline.ClipLoader.sample`), the same clip order and per-clip generators (the pipeline's own
train/eval elements, given this module's source and loader), then `CLIPCAER.from_features`.
Rotation is drawn per clip and changes the pixels before the encoder; it cannot be cached and
`check_config` refuses rotation_degrees != 0.

Format: ArrayRecord, as the TFDS dataset itself. One record per clip and view (`face`,
`context`, `face_flipped`, `context_flipped`): the float32 bytes of [num_frames, embed_dim].
grain reads it with random access by record index (what the pipeline's elements need), and every
chunk of `clips_per_chunk` clips is its own file, so processes write without coordinating (unlike
chunks of one tensorstore array, whose boundaries would have to line up with the clip ranges) and
an interrupted build resumes at the first chunk without its marker.

    <dir>/<split>/chunk-00003.face.array_record    (and .context, .face_flipped, ...)
    <dir>/<split>/chunk-00003.json                 labels, frame counts, video ids, key: done
    <dir>/<split>/cache_info.json                  key and chunk count: the split is complete

<dir> is config.data.feature_cache.dir, or by default `feature_cache/<encoder fingerprint>` in
the dataset's own folder (one cache per encoder, side by side). The key holds a hash of the
image-encoder parameters, the pixel preprocessing (normalisation, image size, compute dtype), the
dataset (name, version, split, record count) and whether flips are cached; a cache whose key
differs from the run's is refused with the fields that changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import flax
import grain
import jax
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from caer_jax import distributed, errors, sharding
from caer_jax.data import augment, clips, pipeline
from caer_jax.models import caer

FORMAT_VERSION = 1
INFO_FILE = "cache_info.json"
FLIPPED = "_flipped"


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a config the cache cannot reproduce, naming the field."""
    if not config.model.freeze_image_encoder:
        raise errors.BadInputError(
            "config.data.feature_cache.enabled needs config.model.freeze_image_encoder=True: "
            "cached features are those of fixed encoder weights"
        )
    if config.data.rotation_degrees != 0:
        raise errors.BadInputError(
            f"config.data.rotation_degrees={config.data.rotation_degrees}: the rotation "
            "augmentation changes the pixels before the image encoder and cannot be cached; "
            "set it to 0 to train from the feature cache"
        )
    if config.data.flip_prob > 0 and not config.data.feature_cache.flipped:
        raise errors.BadInputError(
            f"config.data.flip_prob={config.data.flip_prob} needs flipped features: set "
            "config.data.feature_cache.flipped=True (or flip_prob=0)"
        )


def views(flipped: bool) -> tuple[str, ...]:
    return pipeline.STREAMS + (tuple(s + FLIPPED for s in pipeline.STREAMS) if flipped else ())


def params_sha256(params: Any) -> str:
    """sha256 of a parameter tree: every leaf's path, dtype, shape and bytes, in path order."""
    digest = hashlib.sha256()
    flat = flax.traverse_util.flatten_dict(params)
    for path in sorted(flat):
        leaf = flat[path]
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{'/'.join(path)}:{value.dtype}:{value.shape};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def encoder_fingerprint(config: ml_collections.ConfigDict, encoder_sha256: str) -> dict:
    """What the features depend on besides the frames: weights and pixel preprocessing."""
    return {
        "params_sha256": encoder_sha256,
        "pixel_normalization": config.model.pixel_normalization,
        "image_size": config.data.image_size,
        "dtype": config.model.dtype,
    }


def cache_key(config: ml_collections.ConfigDict, split: str, encoder_sha256: str) -> dict:
    source = pipeline.clip_source(config, split)
    return {
        "format": FORMAT_VERSION,
        "encoder": encoder_fingerprint(config, encoder_sha256),
        "dataset": {
            "name": config.data.tfds_name,
            "version": str(source.dataset_info.version),
            "split": split,
            "num_clips": len(source),
        },
        "flipped": config.data.feature_cache.flipped,
    }


def split_dir(config: ml_collections.ConfigDict, split: str, encoder_sha256: str) -> Path:
    root = config.data.feature_cache.dir
    if not root:
        info = pipeline.clip_source(config, split).dataset_info
        fingerprint = json.dumps(encoder_fingerprint(config, encoder_sha256), sort_keys=True)
        name = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        root = Path(info.data_dir) / "feature_cache" / name
    return Path(root) / split


def _refuse_if_stale(found: dict, expected: dict, where: Path) -> None:
    found_flat, expected_flat = (
        flax.traverse_util.flatten_dict(tree, sep=".") for tree in (found, expected)
    )
    changed = [
        f"{k}: {found_flat.get(k)!r} in the cache, {expected_flat.get(k)!r} now"
        for k in sorted(set(found_flat) | set(expected_flat))
        if found_flat.get(k) != expected_flat.get(k)
    ]
    if changed:
        raise errors.BadInputError(
            f"feature cache {where} is stale, refusing it: {'; '.join(changed)}. Delete it or "
            "point config.data.feature_cache.dir elsewhere (a missing cache is built)"
        )


def _remedy(directory: Path) -> str:
    return (
        f"the feature cache is damaged: delete {directory} and the next train or eval run "
        "builds it again (`python -m caer_jax.data.check --config=...` lists every damaged "
        "record)"
    )


def _read_json(path: Path, directory: Path) -> dict:
    """A JSON file of the cache of `directory`; one that cannot be read or parsed is damage."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        raise errors.DamagedDataError(
            f"{path}: cannot be read ({errors.one_line(e)})", _remedy(directory)
        ) from e


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)  # a reader sees the whole file or none


def _chunk_path(directory: Path, chunk: int, suffix: str) -> Path:
    return directory / f"chunk-{chunk:05d}.{suffix}"


def _encode_fn(model, encoder_params: Any, frames_per_batch: int):
    """frames uint8 [N, S, S, 3] (N <= frames_per_batch) -> float32 features [N, D] on this
    process's devices: each process encodes its own chunks, with no collective."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("frames",))
    batch = math.ceil(frames_per_batch / len(devices)) * len(devices)
    params = jax.device_put({"image_encoder": encoder_params}, NamedSharding(mesh, P()))
    split_frames = NamedSharding(mesh, P("frames"))
    encode = jax.jit(
        sharding.traced_for(
            mesh, lambda p, x: model.apply({"params": p}, x, method="encode_frames")
        ),
        in_shardings=(NamedSharding(mesh, P()), split_frames),
        out_shardings=NamedSharding(mesh, P()),
    )

    def run(frames: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(frames), batch):
            part = frames[start : start + batch]
            padded = np.zeros((batch, *part.shape[1:]), part.dtype)
            padded[: len(part)] = part
            # Placed explicitly: with several processes jit refuses a numpy argument that it
            # would have to split, even over this process's own devices.
            padded = jax.device_put(padded, split_frames)
            out.append(np.asarray(encode(params, padded), np.float32)[: len(part)])
        return np.concatenate(out)

    return run


def _build_chunk(config, source, encode, directory: Path, chunk: int, key: dict, bar) -> None:
    fc = config.data.feature_cache
    start = chunk * fc.clips_per_chunk
    stop = min(start + fc.clips_per_chunk, len(source))
    all_views = views(fc.flipped)
    writers = {
        v: ArrayRecordWriter(
            str(_chunk_path(directory, chunk, f"{v}.array_record")), "group_size:1"
        )
        for v in all_views
    }
    labels, num_frames, video_ids = [], [], []
    for index in range(start, stop):
        clip = source[index]
        n, images = clip.num_frames, clip.images(range(clip.num_frames))
        pixels = {}
        for stream in pipeline.STREAMS:
            pixels[stream] = augment.transform_frames_uint8(images[stream], config.data.image_size)
            if fc.flipped:  # the pixel path's own flip: after the resize, of every frame
                flip = augment.Draw(flip=True)
                pixels[stream + FLIPPED] = augment.transform_frames_uint8(
                    images[stream], config.data.image_size, flip
                )
        features = encode(np.concatenate([pixels[v] for v in all_views]))
        for i, v in enumerate(all_views):
            writers[v].write(np.ascontiguousarray(features[i * n : (i + 1) * n]).tobytes())
        labels.append(clip.label)
        num_frames.append(n)
        video_ids.append(clip.video_id)
        bar.update(n * len(all_views))
    for writer in writers.values():
        writer.close()
    marker = {"key": key, "labels": labels, "num_frames": num_frames, "video_ids": video_ids}
    _write_json(_chunk_path(directory, chunk, "json"), marker)


def build(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    split: str,
    *,
    process_index: int,
    process_count: int,
) -> Path:
    """Builds the cache of `split` where missing (every process its chunks; resumes at the
    chunks without a marker), refuses a stale one; returns its folder. Collective: every process
    calls it."""
    check_config(config)
    encoder = params["image_encoder"]
    sha = params_sha256(encoder)
    key = cache_key(config, split, sha)
    directory = split_dir(config, split, sha)
    info_path = directory / INFO_FILE
    if info_path.exists():
        _refuse_if_stale(_read_json(info_path, directory)["key"], key, directory)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    fc = config.data.feature_cache
    source = pipeline.clip_source(config, split)
    num_chunks = math.ceil(len(source) / fc.clips_per_chunk)
    todo = []
    for chunk in range(process_index, num_chunks, process_count):
        marker = _chunk_path(directory, chunk, "json")
        if marker.exists():
            _refuse_if_stale(_read_json(marker, directory)["key"], key, directory)
        else:
            todo.append(chunk)
    if todo:
        encode = _encode_fn(model, encoder, fc.frames_per_batch)
        bar = tqdm(
            desc=f"feature cache {split} (process {process_index})",
            unit="frame",
            disable=process_index != 0,
        )
        for chunk in todo:
            _build_chunk(config, source, encode, directory, chunk, key, bar)
        bar.close()
    distributed.barrier(f"feature_cache.build {split}")
    if process_index == 0:
        dim = model.geometry.embed_dim
        _write_json(info_path, {"key": key, "num_chunks": num_chunks, "feature_dim": dim})
    distributed.barrier(f"feature_cache.info {split}")
    return directory


class FeatureSource:
    """Random-access clips of a built cache: {view: float32 [num_frames, D]}, label, video_id.

    A chunk file that is missing fails here; one that is cut short or holds flipped bytes fails
    at the read of a record it holds: DamagedDataError naming the file, the clip, and what to do.
    """

    def __init__(self, directory: Path, expected_key: dict | None):
        """`expected_key` None: whatever the cache holds (to check it, not to train on it)."""
        info_path = directory / INFO_FILE
        if not info_path.exists():
            raise errors.MissingInputError(
                f"no feature cache in {directory} ({INFO_FILE} missing): it is built by "
                "caer_jax.train, or feature_cache.build"
            )
        self.directory = directory
        info = _read_json(info_path, directory)
        if expected_key is not None:
            _refuse_if_stale(info["key"], expected_key, directory)
        self.feature_dim = info["feature_dim"]
        chunks = range(info["num_chunks"])
        markers = [_read_json(_chunk_path(directory, c, "json"), directory) for c in chunks]
        self.labels = np.concatenate([m["labels"] for m in markers]).astype(np.int32)
        self.num_frames = np.concatenate([m["num_frames"] for m in markers]).astype(np.int64)
        self.video_ids = [v for m in markers for v in m["video_ids"]]
        self._chunk_ends = np.cumsum([len(m["labels"]) for m in markers])
        self._views = {}
        for v in views(info["key"]["flipped"]):
            paths = [_chunk_path(directory, c, f"{v}.array_record") for c in chunks]
            for path in paths:
                if not path.exists():
                    raise errors.DamagedDataError(f"{path}: missing", _remedy(directory))
            # "path[0:n]": the record counts of the markers, so that no file is opened before a
            # read needs it (a damaged one then fails at that read, naming the clip).
            self._views[v] = grain.sources.ArrayRecordDataSource(
                [
                    f"{path}[0:{n}]"
                    for path, n in zip(paths, np.diff(self._chunk_ends, prepend=0), strict=True)
                ]
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of a feature cache of {len(self)} clips")
        record = {}
        for v, source in self._views.items():
            try:
                data = source[index]
            except clips.READ_ERRORS as e:
                raise self.damaged(index, v, f"cannot be read ({errors.one_line(e)})") from e
            record[v] = np.frombuffer(data, np.float32).reshape(-1, self.feature_dim)
        record.update(label=self.labels[index], video_id=self.video_ids[index])
        return record

    def damaged(self, index: int, view: str, problem: str) -> errors.DamagedDataError:
        chunk = int(np.searchsorted(self._chunk_ends, index, side="right"))
        position = index - (int(self._chunk_ends[chunk - 1]) if chunk else 0)
        path = _chunk_path(self.directory, chunk, f"{view}.array_record")
        return errors.DamagedDataError(
            f"{path}: record {position} (the {view} features of clip {self.video_ids[index]}, "
            f"clip {index} of the cache) {problem}",
            _remedy(self.directory),
        )


class FeatureLoader:
    """Cached record -> model inputs: ClipLoader's frames and flips, then features [T, D]."""

    def __init__(self, config: ml_collections.ConfigDict, feature_dim: int):
        self.clip = pipeline.ClipLoader.from_config(config)
        self.feature_dim = feature_dim

    def load(self, record: dict, index: int, rng: np.random.Generator | None) -> dict:
        frames, draws = self.clip.sample(len(record["face"]), rng)
        out = {
            stream: record[stream + FLIPPED if draws[stream].flip else stream][frames]
            for stream in pipeline.STREAMS
        }
        out.update(label=np.int32(record["label"]), mask=np.bool_(True), index=np.int32(index))
        return out

    def padding(self) -> dict:
        shape = (self.clip.num_frames_out, self.feature_dim)
        out = {stream: np.zeros(shape, np.float32) for stream in pipeline.STREAMS}
        out.update(label=np.int32(0), mask=np.bool_(False), index=np.int32(pipeline.PAD_INDEX))
        return out


def open_split(config: ml_collections.ConfigDict, split: str, params: Any) -> FeatureSource:
    """The built cache of `split` for `params`' image encoder; refused when stale."""
    check_config(config)
    sha = params_sha256(params["image_encoder"])
    return FeatureSource(split_dir(config, split, sha), cache_key(config, split, sha))


def prepare(config: ml_collections.ConfigDict, model, init_rng: jax.Array) -> Any:
    """For training with the cache enabled: the initial parameters, whose frozen image encoder
    the caches of the train, selection and eval splits hold (built here where missing, every
    process its share). None without the cache."""
    if not config.data.feature_cache.enabled:
        return None
    params = caer.init_params(model, config.model, init_rng)
    splits = (config.data.train_split, config.train.selection_split, config.data.eval_split)
    build_here(config, model, params, splits)
    return params


def build_here(config: ml_collections.ConfigDict, model, params: Any, splits) -> None:
    """`build` of each of `splits` (once each) as this process of the running job: every
    process calls it, and builds its share."""
    for split in dict.fromkeys(splits):
        build(
            config,
            model,
            params,
            split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


def apply_method(config: ml_collections.ConfigDict) -> str | None:
    """The CLIPCAER method the steps apply: the head on features, or the whole model on pixels."""
    return "from_features" if config.data.feature_cache.enabled else None


def _source_and_loader(config: ml_collections.ConfigDict, split: str, params: Any) -> tuple:
    """The cache's (source, loader) of `split` for the pipeline, or (None, None) without the
    cache (the pipeline's own ClipSource and ClipLoader)."""
    if not config.data.feature_cache.enabled:
        return None, None
    source = open_split(config, split, params)
    return source, FeatureLoader(config, source.feature_dim)


def train_iterator(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    start_step: int = 0,
) -> grain.DatasetIterator:
    """pipeline.train_iterator, from the cache when it is enabled (`params`: its encoder)."""
    source, loader = _source_and_loader(config, config.data.train_split, params)
    return pipeline.train_iterator(
        config,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        source=source,
        loader=loader,
    )


def eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    params: Any,
    *,
    process_index: int,
    process_count: int,
):
    """pipeline.eval_batches, from the cache when it is enabled (`params`: its encoder)."""
    source, loader = _source_and_loader(config, split, params)
    return pipeline.eval_batches(
        config,
        split,
        process_index=process_index,
        process_count=process_count,
        source=source,
        loader=loader,
    )
