"""End-to-end speed: the real training loop at the paper geometry, as a user would run it.

`python -m caer_jax.bench --end_to_end` (see bench.py) calls `run()`. It builds synthetic clips of
RAER's length (100-300 frames of 640x480) at 224 px with the TFDS builder (or reads `--data_dir`,
a real build), then runs `python -m caer_jax.train` with the ViT-B/32 config twice in fresh
processes, each with its own workdir:

  cold: an empty compilation cache — process start to the first finished step includes every
        compilation (and, on GPUs, autotuning);
  warm: the same command again with the cache the cold run filled.

The cold run's speed.json (written by the training loop itself, caer_jax/host_loop.py) gives the
steady-state training clips/s with the data pipeline, eval clips/s end to end and the time the loop
was blocked on checkpoint saves. The step alone is timed in this process on the same mesh and
program (bench.bench_model), and the input pipeline on its own per grain worker count
(`pipeline_rates`), with a per-stage breakdown of one clip's host work (`stage_breakdown`).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np

from caer_jax import config_files

REPO = config_files.CONFIG_DIR.parent


def build_raer_length_clips(
    root: Path, num_clips: int, seed: int = 0, max_frames: int = 300
) -> Path:
    """Synthetic clips of RAER's length packed at 224 px; returns the TFDS data_dir."""
    import tensorflow_datasets as tfds

    import tfds_raer  # noqa: F401  (registers the "raer" builder)
    from caer_jax.data import synthetic

    raw, data_dir = root / "raer", root / "tfds"
    synthetic.generate(
        raw,
        num_clips=num_clips,
        seed=seed,
        width=640,
        height=480,
        min_frames=100,
        max_frames=max_frames,
        test_fraction=0.2,
    )
    builder = tfds.builder("raer/224px", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
    return data_dir


def repeat_clips_of(
    data_dir: Path, out_dir: Path, times: int, tfds_name: str = "raer/224px"
) -> Path:
    """A copy of the `tfds_name` build in `data_dir` whose every split holds each clip `times`
    times (the copies are read, parsed and decoded like distinct clips). It lets a small built
    dataset, one that fits on a machine without TensorFlow to build it, feed many steps."""
    from array_record.python import array_record_module

    from tfds_raer.raer import frame_records

    (version_dir,) = (data_dir / tfds_name).iterdir()
    target = out_dir / tfds_name / version_dir.name
    target.mkdir(parents=True)
    info = json.loads((version_dir / "dataset_info.json").read_text())
    metadata = json.loads((version_dir / "metadata.json").read_text())
    tables = metadata[frame_records.METADATA_KEY]
    for split in info["splits"]:
        shards = sorted(version_dir.glob(f"raer-{split['name']}.array_record-*"))
        records = []
        for shard in shards:
            reader = array_record_module.ArrayRecordReader(str(shard))
            records += reader.read_all()
            reader.close()
        out = target / f"raer-{split['name']}.array_record-00000-of-00001"
        writer = array_record_module.ArrayRecordWriter(str(out), "group_size:1")
        for record in records * times:  # frame records: whole clips, in order, `times` over
            writer.write(record)
        writer.close()
        split["shardLengths"] = [str(len(records) * times)]
        split["numBytes"] = str(out.stat().st_size)
        tables[split["name"]] = {k: v * times for k, v in tables[split["name"]].items()}
    (target / "dataset_info.json").write_text(json.dumps(info))
    (target / "metadata.json").write_text(json.dumps(metadata))
    for extra in version_dir.iterdir():  # features.json and the other metadata files
        if not extra.name.startswith("raer-") and not (target / extra.name).exists():
            shutil.copy(extra, target / extra.name)
    return out_dir


def paper_config(
    data_dir: str, batch_size: int, epochs: int, dtype: str
) -> ml_collections.ConfigDict:
    """The paper's config on `data_dir` with random CLIP weights (speed does not depend on the
    values; nothing is downloaded) and the given batch, epochs and compute dtype."""
    config = config_files.load("clip_caer_b32").get_config()
    config.model.clip.source = "random"
    config.data.data_dir = str(data_dir)
    config.train.batch_size = batch_size
    config.train.eval_batch_size = batch_size
    config.train.num_epochs = epochs
    config.train.log_every_steps = 10
    config.model.dtype = dtype
    return config


def _overrides(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> list[str]:
    flat = (
        lambda c, p="": (  # noqa: E731
            [kv for k, v in c.items() for kv in flat(v, f"{p}{k}.")]
            if isinstance(c, ml_collections.ConfigDict)
            else [(p[:-1], c)]
        )
    )
    ours, theirs = dict(flat(config)), dict(flat(base))
    return [f"--config.{k}={v}" for k, v in ours.items() if theirs.get(k) != v]


def train_process(
    config: ml_collections.ConfigDict,
    workdir: Path,
    cache_dir: Path,
    config_name: str = "clip_caer_b32",
) -> dict:
    """Runs `python -m caer_jax.train` for `config` (given as overrides of configs/<config_name>)
    in a new process; returns its speed.json with the wall time from spawning the process to its
    first finished step."""
    config_module = config_files.load(config_name)
    command = [
        sys.executable,
        "-m",
        "caer_jax.train",
        f"--config={config_module.__file__}",
        f"--workdir={workdir}",
        f"--compilation_cache={cache_dir}",
        *_overrides(config, config_module.get_config()),
    ]
    spawned = time.time()
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(
            f"training process failed ({run.returncode}): {' '.join(command)}\n{run.stderr[-4000:]}"
        )
    speed = json.loads((workdir / "speed.json").read_text())
    speed["spawn_to_first_step_s"] = speed["first_step_done_unix_time"] - spawned
    speed["process_wall_s"] = time.time() - spawned
    return speed


def _cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its live child processes (grain's workers);
    None where /proc cannot tell a child's (not Linux)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def pipeline_rates(
    config: ml_collections.ConfigDict, worker_counts: list[int], num_batches: int
) -> list[dict]:
    """The project's train iterator alone, per grain worker count: clips/s, and clips per
    CPU-second of this process and its workers together (the rate per core kept busy)."""
    from caer_jax.data import pipeline

    results = []
    for workers in worker_counts:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.worker_count = workers
        iterator = pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)
        # Start-up (worker start) is not throughput, and the window should begin in the steady
        # state: batches read ahead before it would otherwise count as free.
        for _ in range(2 + workers * config.data.prefetch_buffer_size):
            next(iterator)
        cpu, start = _cpu_seconds(), time.perf_counter()
        for _ in itertools.islice(iterator, num_batches):
            pass
        seconds = time.perf_counter() - start
        cpu_end = _cpu_seconds()
        iterator.close()
        clips = num_batches * config.train.batch_size
        result = {"worker_count": workers, "clips_per_s": clips / seconds}
        if cpu is not None and cpu_end is not None:
            result["cpu_seconds"] = cpu_end - cpu
            result["clips_per_cpu_second"] = clips / (cpu_end - cpu)
        results.append(result)
    return results


def stage_breakdown(config: ml_collections.ConfigDict, num_clips: int) -> dict:
    """CPU milliseconds per train clip in each stage of the host's work, in one thread:
    reading and parsing the sampled frames' records, decoding their 2 x num_segments crops, and
    the rotation/resize/flip."""
    from caer_jax.data import augment, pipeline

    source = pipeline.clip_source(config, config.data.train_split)
    loader = pipeline.ClipLoader.from_config(config)
    rng = np.random.default_rng(0)
    totals = {"read_parse": 0.0, "decode": 0.0, "transform": 0.0}
    clips = min(num_clips, len(source))
    for index in range(clips):
        clip = source[index]
        frames, draws = loader.sample(clip.num_frames, rng)
        t0 = time.process_time()
        encoded = clip.read(frames)
        t1 = time.process_time()
        images = {s: [augment.decode_image(data) for data in encoded[s]] for s in draws}
        t2 = time.process_time()
        for stream, draw in draws.items():
            augment.transform_frames_uint8(images[stream], config.data.image_size, draw)
        t3 = time.process_time()
        totals["read_parse"] += t1 - t0
        totals["decode"] += t2 - t1
        totals["transform"] += t3 - t2
    out = {f"{k}_ms_per_clip": 1e3 * v / clips for k, v in totals.items()}
    out["total_ms_per_clip"] = sum(1e3 * v / clips for v in totals.values())
    out["clips_per_cpu_second"] = 1e3 / out["total_ms_per_clip"]
    return out


def run(
    scratch: Path,
    cache: Path,
    *,
    data_dir: str | None,
    num_clips: int,
    batch_size: int,
    epochs: int,
    dtype: str,
    worker_counts: list[int],
    pipeline_batches: int,
    repeat_clips: int,
    measure_step: Callable[[ml_collections.ConfigDict, int], dict],
) -> dict:
    """All end-to-end figures (see the module docstring) as a dict. `scratch` is a temporary
    folder; `cache` the persistent compilation cache of the calling process, which the training
    processes share (empty before the cold run). `measure_step(config, steps_per_epoch)` times
    the step alone (bench.bench_model). With `repeat_clips` > 1 every clip of a copy of
    the dataset is stored that many times (see `repeat_clips_of`)."""
    from caer_jax.data import pipeline as pipeline_lib

    started = time.perf_counter()
    synthetic = not data_dir
    if synthetic:
        data_dir = str(build_raer_length_clips(scratch, num_clips))
    if repeat_clips > 1:
        data_dir = str(repeat_clips_of(Path(data_dir), scratch / "repeated", repeat_clips))
    build_seconds = time.perf_counter() - started
    config = paper_config(data_dir, batch_size, epochs, dtype)
    cold = train_process(config, scratch / "cold", cache)
    warm = train_process(config, scratch / "warm", cache)
    # The step alone: the training run's program on the same mesh (a cache hit).
    steps_per_epoch = pipeline_lib.steps_per_epoch(config)
    step = measure_step(config, steps_per_epoch)
    pipeline = pipeline_rates(config, worker_counts, pipeline_batches)
    stages = stage_breakdown(config, num_clips=8)
    ratio = cold.get("train_clips_per_s", 0.0) / step["train_clips_per_s"]
    return {
        "data": (f"{num_clips} synthetic RAER-length clips" if synthetic else data_dir)
        + (f", each clip stored {repeat_clips} times" if repeat_clips > 1 else ""),
        "dataset_build_s": build_seconds,
        "batch_clips": batch_size,
        "dtype": dtype,
        "cold": cold,
        "warm": warm,
        "step_only": step,
        "end_to_end_over_step_only": ratio,
        "pipeline": pipeline,
        "pipeline_stages": stages,
    }


def describe(r: dict) -> list[str]:
    """The printout of `run()`'s figures."""
    cold, warm, step = r["cold"], r["warm"], r["step_only"]
    lines = [
        f"end to end, ViT-B/32 {r['dtype']} batch {r['batch_clips']} on {r['data']}:",
        f"  process start -> first finished step: cold {cold['process_start_to_first_step_s']:.1f} s"
        f" ({cold['compilation']['programs']} programs, "
        f"{cold['compilation']['compile_or_load_seconds']:.1f} s compiling), warm cache "
        f"{warm['process_start_to_first_step_s']:.1f} s ({warm['compilation']['programs']} "
        f"programs, {warm['compilation']['persistent_cache_hits']} from the cache, "
        f"{warm['compilation']['compile_or_load_seconds']:.1f} s)",
        f"  training with pipeline and loop: {cold.get('train_clips_per_s', float('nan')):.1f} "
        f"clips/s over {cold.get('steady_steps', 0)} steps; step alone "
        f"{step['train_clips_per_s']:.1f} clips/s; ratio "
        f"{100 * r['end_to_end_over_step_only']:.0f} %",
        f"  eval end to end: {cold.get('eval_clips_per_s', float('nan')):.1f} clips/s; blocked on "
        f"checkpoint saves {cold['checkpoint_blocked_seconds']:.2f} s during training "
        f"(+{cold['checkpoint_final_wait_seconds']:.2f} s final wait)",
    ]
    for p in r["pipeline"]:
        per_core = (
            f" = {p['clips_per_cpu_second']:.1f} clips per CPU-second ({p['cpu_seconds']:.1f} "
            f"CPU-s, workers included)"
            if "clips_per_cpu_second" in p
            else ""
        )
        lines.append(
            f"  pipeline, {p['worker_count']} workers: {p['clips_per_s']:.1f} clips/s{per_core}"
        )
    s = r["pipeline_stages"]
    lines.append(
        f"  host work per clip (one thread): read+parse {s['read_parse_ms_per_clip']:.1f} ms, "
        f"decode {s['decode_ms_per_clip']:.1f} ms, rotate/resize/flip "
        f"{s['transform_ms_per_clip']:.1f} ms = {s['clips_per_cpu_second']:.1f} clips per CPU-second"
    )
    return lines
