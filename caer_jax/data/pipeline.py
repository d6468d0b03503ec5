"""Input pipeline: tfds.data_source + grain, TSN sampling, augmentation, per-host batches.

Clips come from `clips.ClipSource` over `tfds.data_source` (ArrayRecord, random access, one
record per frame): only the sampled frames are read and decoded. grain's MapDataset API does the
rest: a map from the position in the stream to a clip, batching, thread or process prefetch.
Its iterator is a `grain.DatasetIterator` whose state (`get_state()`, a small JSON-able dict) is
what a checkpoint saves (orbax: `grain.checkpoint.CheckpointSave(item=iterator)`).

Train order: every epoch a fresh permutation of all records (a function of seed and epoch), cut
to whole global batches (the remainder is dropped, per epoch); global batch b is rows
[b * batch_size, (b + 1) * batch_size) of it and process p takes its p-th block of
batch_size // process_count rows. The global batch is therefore the same for any number of
processes. Frame offsets and augmentation draws come from a generator seeded by
(seed, epoch, record), so they do not depend on workers, threads or restarts.

Eval: records in file order, global batches of eval_batch_size, each process its block of rows,
the last batch padded with mask=False rows (index -1, zero pixels); every clip appears once.

Worker processes (config.data.worker_count != 0) need absl's flags parsed: grain's start-up reads
its flag --grain_enable_multiprocess_worker_profiling in the calling process. Every command
parses them (absl.app); a script or notebook outside absl.app calls
`absl.flags.FLAGS.mark_as_parsed()` first (tests/conftest.py does).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import tfds_raer  # noqa: F401  (registers the "raer" builder)
from caer_jax import errors, sharding
from caer_jax.data import augment, clips, prepare, sampling

STREAMS = clips.STREAMS
PAD_INDEX = -1
# Distinct seed-sequence prefixes, so that shuffles and per-clip draws never share a stream.
_SHUFFLE_KEY, _CLIP_KEY = 0, 1


def clip_source(config: ml_collections.ConfigDict, split: str) -> clips.ClipSource:
    """The clips of `split`, by index (the batches' "index")."""
    try:
        return clips.ClipSource.open(
            config.data.tfds_name, split, data_dir=config.data.data_dir or None
        )
    except errors.UserError:
        raise
    except (KeyError, ValueError):
        prepare.check_split(config, split)  # a dataset not built, or no such split: say which
        raise


def num_clips(config: ml_collections.ConfigDict, split: str) -> int:
    return len(clip_source(config, split))


def video_ids(config: ml_collections.ConfigDict, split: str) -> list[str]:
    """video_id of every clip of `split`, by index (the batches' "index")."""
    return clip_source(config, split).video_ids


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The dataset's class names (its ClassLabel, from the label set it was built with)."""
    builder = tfds.builder(config.data.tfds_name, data_dir=config.data.data_dir or None)
    return list(builder.info.features["label"].names)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Train steps per epoch: whole global batches of the train split (the remainder dropped)."""
    n = num_clips(config, config.data.train_split)
    steps = n // config.train.batch_size
    if steps == 0:
        raise errors.BadInputError(
            f"train split {config.data.train_split!r} of {config.data.tfds_name} has {n} clips, "
            f"fewer than one batch (config.train.batch_size={config.train.batch_size})"
        )
    return steps


def _local_batch_size(global_batch_size: int, process_count: int, field: str) -> int:
    if global_batch_size % process_count:
        raise errors.BadInputError(
            f"config.train.{field}={global_batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


@dataclasses.dataclass(frozen=True)
class ClipLoader:
    """Clip -> model inputs: sample frames, read and decode them, transform them."""

    num_segments: int
    duration: int
    image_size: int
    rotation_degrees: float
    flip_prob: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> ClipLoader:
        d = config.data
        return cls(d.num_segments, d.duration, d.image_size, d.rotation_degrees, d.flip_prob)

    @property
    def num_frames_out(self) -> int:
        return self.num_segments * self.duration

    def sample(
        self, num_frames: int, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, dict[str, augment.Draw]]:
        """The frames of a clip the model sees and each stream's augmentation draw.

        `rng` None: eval sampling, no augmentation; else train sampling and one draw/stream.
        The feature cache samples through this too, so both paths see the same frames and flips.
        """
        if rng is None:
            offsets = sampling.eval_indices(num_frames, self.num_segments, self.duration)
        else:
            offsets = sampling.train_indices(num_frames, self.num_segments, self.duration, rng)
        frames = sampling.frame_indices(offsets, self.duration, num_frames)
        # Same order of draws every time: offsets, then face, then context.
        draws = {
            stream: augment.IDENTITY
            if rng is None
            else augment.random_draw(rng, self.rotation_degrees, self.flip_prob)
            for stream in STREAMS
        }
        return frames, draws

    def load(self, clip: clips.Clip, index: int, rng: np.random.Generator | None) -> dict:
        """`rng` None: eval sampling, no augmentation; else train sampling and one draw/stream."""
        frames, draws = self.sample(clip.num_frames, rng)
        images = clip.images(frames)
        out = {}
        for stream in STREAMS:
            # uint8 all the way to the device (the jitted step makes them float).
            out[stream] = augment.transform_frames_uint8(
                images[stream], self.image_size, draws[stream]
            )
        out["label"] = np.int32(clip.label)
        out["mask"] = np.bool_(True)
        out["index"] = np.int32(index)
        return out

    def padding(self) -> dict:
        shape = (self.num_frames_out, self.image_size, self.image_size, 3)
        out = {stream: np.zeros(shape, np.uint8) for stream in STREAMS}
        out.update(label=np.int32(0), mask=np.bool_(False), index=np.int32(PAD_INDEX))
        return out


class _TrainElement:
    """Position in this process's train stream -> an augmented clip.

    Position i is row r of global batch `step` of epoch `start_epoch + e`, with
    (e, step, r) from i; the record is that epoch's permutation at step * global + block + r.
    A stream that starts mid-epoch starts at a later position, not at another mapping.
    """

    def __init__(
        self, source, loader, *, seed, global_batch, process_index, process_count, start_epoch
    ):
        self.source = source
        self.loader = loader
        self.seed = int(seed)
        self.num_records = len(source)
        self.global_batch = global_batch
        self.local_batch = _local_batch_size(global_batch, process_count, "batch_size")
        self.block = process_index * self.local_batch
        self.steps = self.num_records // global_batch
        self.start_epoch = start_epoch
        self._permutation = (-1, None)  # (epoch, permutation) of the last epoch seen

    @property
    def elements_per_epoch(self) -> int:
        return self.steps * self.local_batch

    def permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._permutation
        if cached_epoch != epoch:
            rng = np.random.default_rng([_SHUFFLE_KEY, self.seed, epoch])
            perm = rng.permutation(self.num_records)
            self._permutation = (epoch, perm)  # one assignment: safe across reader threads
        return perm

    def record_at(self, position: int) -> tuple[int, int]:
        """(epoch, record index) of `position` in this process's stream."""
        epoch, within = divmod(position, self.elements_per_epoch)
        epoch += self.start_epoch
        step, row = divmod(within, self.local_batch)
        return epoch, int(self.permutation(epoch)[step * self.global_batch + self.block + row])

    def __call__(self, position: int) -> dict:
        epoch, index = self.record_at(position)
        rng = np.random.default_rng([_CLIP_KEY, self.seed, epoch, index])
        return self.loader.load(self.source[index], index, rng)


class _EvalElement:
    """Position in this process's eval stream -> a clip at its centred frames, or padding."""

    def __init__(self, source, loader, *, global_batch, process_index, process_count):
        self.source = source
        self.loader = loader
        self.num_records = len(source)
        self.global_batch = global_batch
        self.local_batch = _local_batch_size(global_batch, process_count, "eval_batch_size")
        self.block = process_index * self.local_batch
        self.steps = math.ceil(self.num_records / global_batch)

    def record_at(self, position: int) -> int:
        step, row = divmod(position, self.local_batch)
        index = step * self.global_batch + self.block + row
        return index if index < self.num_records else PAD_INDEX

    def __call__(self, position: int) -> dict:
        index = self.record_at(position)
        if index == PAD_INDEX:
            return self.loader.padding()
        return self.loader.load(self.source[index], index, None)


def worker_count(config: ml_collections.ConfigDict) -> int:
    """grain worker processes of this host: config.data.worker_count, or with -1 one per core
    this process may run on."""
    count = config.data.worker_count
    if count == -1:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if count < 0:
        raise errors.BadInputError(
            f"config.data.worker_count={count}; expected -1 (one per core) or >= 0"
        )
    return count


def _iterate(
    element_fn, positions: range, batch_size: int, config: ml_collections.ConfigDict
) -> grain.DatasetIterator:
    # Batches read ahead (and reader threads) per process; grain wants threads <= buffer.
    prefetch = max(1, config.data.prefetch_buffer_size)
    dataset = (
        grain.MapDataset.range(positions.start, positions.stop)
        .map(element_fn)
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    )
    workers = worker_count(config)
    if workers > 0:
        _unlink_freed_batches_at_exit()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers,
                per_worker_buffer_size=prefetch,
            )
        )
    # Pixels stay uint8: the jitted step scales them (caer.pixels_to_unit_range). Batches made
    # by worker processes arrive in shared memory, which grain unlinks when the arrays are freed.
    return iter(dataset)


@functools.cache  # registered once per process
def _unlink_freed_batches_at_exit() -> None:
    atexit.register(finish_shared_memory_unlinks)


def finish_shared_memory_unlinks() -> None:
    """Waits for the unlinking of worker batches already freed.

    grain (0.2.x) unlinks a freed batch's shared memory on a background thread, which an exit
    right after the last batches were freed (a command's `error:` line after a damaged record)
    would stop with some of them still queued: multiprocessing's resource tracker then warns of
    "leaked shared_memory objects". Registered with atexit, it runs before multiprocessing's own
    exit handler ends that thread; batches freed after it are unlinked at once. grain has no
    public call for this, hence its private attributes, read defensively: without the pool there
    is nothing queued to wait for.
    """
    array_type = grain.multiprocessing.SharedMemoryArray
    pool = getattr(array_type, "_del_thread_pool", None)
    if pool is None:
        return
    pool.close()
    pool.join()
    array_type._disable_async_del()


def train_iterator(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    start_step: int = 0,
    source: Any = None,
    loader: Any = None,
) -> grain.DatasetIterator:
    """Endless iterator of this process's train batches, from global batch `start_step`.

    Each epoch is a fresh shuffle with steps_per_epoch(config) batches of
    config.train.batch_size // process_count clips. Checkpoint with `get_state()` and resume with
    `set_state(state)` on an iterator made with the same arguments; or, with any process count,
    make a new one at the step to resume from (the global batches are the same).
    `source` and `loader` replace the ClipSource and the ClipLoader (the feature cache's, or
    the pretraining pairs'): anything indexable, and an object whose `load(item, index, rng)`
    makes an example of `source[index]`.
    """
    if source is None:
        source = clip_source(config, config.data.train_split)
        steps = steps_per_epoch(config)
    else:
        steps = len(source) // config.train.batch_size
    start_epoch, first_step = divmod(start_step, steps)
    element = _TrainElement(
        source,
        ClipLoader.from_config(config) if loader is None else loader,
        seed=seed,
        global_batch=config.train.batch_size,
        process_index=process_index,
        process_count=process_count,
        start_epoch=start_epoch,
    )
    # Endless: the length is a whole number of epochs close to sys.maxsize.
    length = (sys.maxsize // 2 // element.elements_per_epoch) * element.elements_per_epoch
    positions = range(first_step * element.local_batch, length)
    return _iterate(element, positions, element.local_batch, config)


def eval_batches(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    process_index: int,
    process_count: int,
    source: Any = None,
    loader: Any = None,
) -> Iterator[dict]:
    """This process's eval batches of `split`: every clip once over all processes, padded.
    `source` and `loader` as in train_iterator."""
    element = _EvalElement(
        clip_source(config, split) if source is None else source,
        ClipLoader.from_config(config) if loader is None else loader,
        global_batch=config.train.eval_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    iterator = _iterate(
        element, range(element.steps * element.local_batch), element.local_batch, config
    )
    try:
        yield from iterator
    finally:
        iterator.close()  # stops worker processes and frees their shared memory now


def global_batch(host_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host batches of all processes -> global jax.Arrays split over ("data", "fsdp") on dim 0."""
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
        for key, value in host_batch.items()
    }
