"""Speed figures: `python -m caer_jax.bench [--out=bench.json] [--skip_paper] [--build_clips=20]`.

On a CPU host run it as `launch/with_jemalloc.sh python -m caer_jax.bench` (what `make bench`
does), as training should be run there: the figures record which malloc the process used.

Prints and writes (JSON) the measured large-matmul FLOP/s of this machine, and for the tiny and
the paper geometry (ViT-B/32, 16 frames, two streams): train-step time, clips/s, model FLOPs per
step from XLA's cost analysis and their ratio to the matmul rate, and eval clips/s; the input
pipeline's clips/s on the embedded default's dataset; and the TFDS builder's rate on synthetic
clips of RAER-like length (100-300 frames of 640x480), projected to the 2,700 clips of RAER.
Step timings are medians over repeated calls after compilation, with inputs already on device.

`--feature_cache` adds the frozen-encoder feature cache at the paper geometry (ViT-B/32, 16
frames, 224 px, batch 8) on synthetic clips built here: the cache build rate (frames/s through
the encoder) and the time of a train step, input pipeline included, from the cache and from
pixels with the same frozen encoder, both projected to an epoch of RAER (2,160 train clips).
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from caer_jax import optim, steps
from caer_jax import state as state_lib
from caer_jax.models import caer
from configs import clip_caer_b32, synthetic_tiny

RAER_CLIPS = 2700
RAER_TRAIN_CLIPS = RAER_CLIPS * 4 // 5  # train is about 4x test

_OUT = flags.DEFINE_string("out", None, "Write the figures to this JSON file too.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 8, "Clips per step at the paper geometry.")
_SKIP_PAPER = flags.DEFINE_bool("skip_paper", False, "Skip the (slow on CPU) ViT-B/32 geometry.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 40, "Batches timed in the pipeline.")
_BUILD_CLIPS = flags.DEFINE_integer("build_clips", 12, "RAER-length clips to build (0: skip).")
_SKIP_DATA = flags.DEFINE_bool(
    "skip_data", False, "Model figures only (no TFDS/grain needed, e.g. on an accelerator host)."
)
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 4096, "Side of the reference matmul (8192 saturates an H100/H200)."
)
_PAPER_DTYPE = flags.DEFINE_string("paper_dtype", "float32", "Compute dtype of the ViT-B/32 run.")
_FEATURE_CACHE = flags.DEFINE_bool(
    "feature_cache", False, "Also measure the feature cache against pixels (frozen encoder)."
)
_CACHE_CLIPS = flags.DEFINE_integer("cache_clips", 10, "Synthetic clips for --feature_cache.")
_PIXEL_STEPS = flags.DEFINE_integer("pixel_steps", 2, "Timed pixel-path steps (--feature_cache).")
_CACHE_STEPS = flags.DEFINE_integer("cache_steps", 30, "Timed cached steps (--feature_cache).")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> float:
    """Achieved FLOP/s of one large square matmul in `dtype`: the machine's reference rate."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b), repeats)


def bench_model(
    config: ml_collections.ConfigDict,
    batch_size: int,
    repeats: int,
    reference_rate: Callable[[], float],
) -> dict:
    """Train-step and eval-step figures of `config`'s model on random clips.

    The utilisation divides by the higher of two `reference_rate()` measurements taken right
    before and right after the timed steps: a shared or throttled host changes speed within
    minutes, and the higher reference never flatters the ratio.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.clip.source = "random"  # speed does not depend on the weights' values
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    params = caer.init_params(model, config.model, jax.random.key(0))
    tx = optim.make_optimizer(params, config.optim, steps_per_epoch=100)
    state = state_lib.create(params, tx)
    face, context = state_lib.dummy_inputs(config, batch_size)
    batch = {
        "face": face + 0.5,
        "context": context + 0.5,
        "label": jnp.arange(batch_size) % 5,
    }
    step = jax.jit(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            dropout_rng=jax.random.key(1),
            streams=config.model.streams,
        )
    )
    compiled = step.lower(state, batch).compile()
    # XLA's count of the compiled program. On GPU it leaves out the cuBLAS GEMM calls (seen on
    # an H200: 135 GFLOP for a ViT-B/32 step that the CPU compilation counts at 6.8 TFLOP), so
    # utilisation is only meaningful where the backend counts its matmuls (CPU, TPU).
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    rate_before = reference_rate()
    step_time = median_seconds(lambda: compiled(state, batch)[1]["loss"], repeats)
    peak = max(rate_before, reference_rate())

    def forward(params, batch):
        face, context = steps.stream_inputs(batch, config.model.streams)
        return model.apply({"params": params}, face, context, train=False)[0]

    forward = jax.jit(forward)
    eval_time = median_seconds(lambda: forward(params, batch), repeats)
    return {
        "batch_clips": batch_size,
        "frames_per_clip": config.data.num_segments,
        "image_size": config.data.image_size,
        "streams": config.model.streams,
        "dtype": config.model.dtype,
        "train_step_s": step_time,
        "train_clips_per_s": batch_size / step_time,
        "train_step_flops": flops,
        "achieved_flops_per_s": flops / step_time,
        "reference_matmul_flops_per_s": peak,
        "utilisation_of_matmul_rate": flops / step_time / peak,
        "eval_clips_per_s": batch_size / eval_time,
    }


def bench_pipeline(config: ml_collections.ConfigDict, num_batches: int) -> dict:
    """Train-iterator clips/s on the embedded default's dataset (built if missing)."""
    # Imported here: the model figures must also run where TFDS and grain are not installed.
    from caer_jax.data import pipeline, prepare

    prepare.prepare_data(config)
    iterator = pipeline.train_iterator(config, seed=0, process_index=0, process_count=1)
    next(iterator)  # start-up (and worker start) is not throughput
    start = time.perf_counter()
    for batch in itertools.islice(iterator, num_batches):
        del batch
    seconds = time.perf_counter() - start
    iterator.close()
    clips = num_batches * config.train.batch_size
    return {
        "frames_per_clip": config.data.num_segments,
        "image_size": config.data.image_size,
        "worker_count": config.data.worker_count,
        "clips_per_s": clips / seconds,
    }


def bench_build(num_clips: int) -> dict:
    """Builder rate on RAER-like clips (100-300 frames of 640x480) at the paper's 224 px."""
    from caer_jax.data import synthetic
    from tfds_raer.raer import benchmark as build_benchmark

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raer"
        synthetic.generate(
            raw,
            num_clips=num_clips,
            seed=0,
            width=640,
            height=480,
            min_frames=100,
            max_frames=300,
            test_fraction=0.2,
        )
        rate = build_benchmark.build_rate(
            raw, config="224px", data_dir=Path(tmp) / "tfds", quiet=True
        )
    rate["projected_raer_minutes"] = RAER_CLIPS / rate["clips_per_s"] / 60
    return rate


def _timed_steps(iterator, step, state, num_steps: int) -> tuple[float, object]:
    """Seconds per train step, next batch included, after one untimed (compiling) step."""
    state, out = step(state, next(iterator))
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(num_steps):
        state, out = step(state, next(iterator))
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / num_steps, state


def bench_feature_cache(
    config: ml_collections.ConfigDict, *, num_clips: int, pixel_steps: int, cache_steps: int
) -> dict:
    """Feature cache vs pixels with the same frozen encoder, on synthetic clips built here.

    The clips are num_segments frames long and flips are off on both paths (flipped features
    double the build, frame for frame, and change no step): the build rate is per frame, and a
    step costs the same for any clip length.
    """
    from caer_jax.data import feature_cache, prepare, synthetic

    config = ml_collections.ConfigDict(config.to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        config.model.clip.source = "random"
        config.model.freeze_image_encoder = True
        config.data.rotation_degrees = 0.0  # uncacheable; off on both paths alike
        config.data.flip_prob = 0.0
        config.data.feature_cache.flipped = False
        config.data.data_dir = str(Path(tmp) / "tfds")
        config.data.synthetic.enabled = True
        config.data.synthetic.manual_dir = str(Path(tmp) / "raer")
        config.data.synthetic.num_clips = num_clips
        config.data.feature_cache.dir = str(Path(tmp) / "cache")
        length = config.data.num_segments
        synthetic.generate(
            config.data.synthetic.manual_dir,
            num_clips=num_clips,
            seed=0,
            min_frames=length,
            max_frames=length,
        )
        prepare.prepare_data(config)
        model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
        params = caer.init_params(model, config.model, jax.random.key(0))
        start = time.perf_counter()
        directory = feature_cache.build(
            config, model, params, config.data.train_split, process_index=0, process_count=1
        )
        build_s = time.perf_counter() - start
        info = json.loads((directory / feature_cache.INFO_FILE).read_text())
        source = feature_cache.FeatureSource(directory, info["key"])
        frames = int(source.num_frames.sum()) * len(
            feature_cache.views(config.data.feature_cache.flipped)
        )
        tx = optim.make_optimizer(params, config.optim, 100, freeze_image_encoder=True)
        seconds = {}
        for path, enabled, num_steps in (
            ("pixels", False, pixel_steps),
            ("cache", True, cache_steps),
        ):
            config.data.feature_cache.enabled = enabled
            step = jax.jit(
                functools.partial(
                    steps.train_step,
                    model=model,
                    tx=tx,
                    dropout_rng=jax.random.key(1),
                    streams=config.model.streams,
                    method=feature_cache.apply_method(config),
                )
            )
            iterator = feature_cache.train_iterator(
                config, params, seed=0, process_index=0, process_count=1
            )
            seconds[path], _ = _timed_steps(iterator, step, state_lib.create(params, tx), num_steps)
            iterator.close()
    steps_per_epoch = RAER_TRAIN_CLIPS // config.train.batch_size
    return {
        "image_size": config.data.image_size,
        "frames_per_clip": config.data.num_segments,
        "batch_clips": config.train.batch_size,
        "flipped": config.data.feature_cache.flipped,
        "build_frames": frames,
        "build_frames_per_s": frames / build_s,
        "pixel_step_s": seconds["pixels"],
        "cache_step_s": seconds["cache"],
        "raer_steps_per_epoch": steps_per_epoch,
        "pixel_epoch_s": seconds["pixels"] * steps_per_epoch,
        "cache_epoch_s": seconds["cache"] * steps_per_epoch,
        "epoch_speedup": seconds["pixels"] / seconds["cache"],
    }


def host_allocator() -> str:
    """Which malloc this process runs on: jemalloc (preloaded by launch/with_jemalloc.sh) or the
    system's. Recorded with the figures: on CPU it moves the paper-geometry step by 10-30 %."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "system"


def run(argv=()) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reference = functools.partial(
        matmul_flops_per_second, n=_MATMUL_SIZE.value, repeats=_REPEATS.value
    )
    peak = reference("float32")
    results = {
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "host_allocator": host_allocator(),
        "matmul_flops_per_s": peak,
        "tiny": bench_model(
            synthetic_tiny.get_config(), 8, _REPEATS.value, functools.partial(reference, "float32")
        ),
    }
    if not _SKIP_PAPER.value:
        paper = clip_caer_b32.get_config()
        paper.model.dtype = _PAPER_DTYPE.value
        results["paper_b32"] = bench_model(
            paper,
            _PAPER_BATCH.value,
            max(2, _REPEATS.value // 2),
            functools.partial(reference, _PAPER_DTYPE.value),
        )
    if not _SKIP_DATA.value:
        results["pipeline"] = bench_pipeline(synthetic_tiny.get_config(), _PIPELINE_BATCHES.value)
    if _BUILD_CLIPS.value and not _SKIP_DATA.value:
        results["build_224px"] = bench_build(_BUILD_CLIPS.value)
    if _FEATURE_CACHE.value:
        results["feature_cache"] = bench_feature_cache(
            clip_caer_b32.get_config(),
            num_clips=_CACHE_CLIPS.value,
            pixel_steps=_PIXEL_STEPS.value,
            cache_steps=_CACHE_STEPS.value,
        )
    print(
        f"device {results['device']} x{results['num_devices']} ({results['host_allocator']} "
        f"malloc): matmul {peak / 1e9:.1f} GFLOP/s"
    )
    for name in ("tiny", "paper_b32"):
        if name in results:
            r = results[name]
            print(
                f"{name:>9}: train step {r['train_step_s'] * 1e3:.1f} ms "
                f"({r['train_clips_per_s']:.1f} clips/s), {r['train_step_flops'] / 1e9:.1f} GFLOP/step, "
                f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                f"{100 * r['utilisation_of_matmul_rate']:.0f}% of the {r['dtype']} matmul's "
                f"{r['reference_matmul_flops_per_s'] / 1e9:.0f}; "
                f"eval {r['eval_clips_per_s']:.1f} clips/s"
            )
    if "pipeline" in results:
        p = results["pipeline"]
        print(
            f" pipeline: {p['clips_per_s']:.1f} clips/s ({p['frames_per_clip']} frames of "
            f"{p['image_size']} px per stream, {p['worker_count']} workers)"
        )
    if "build_224px" in results:
        b = results["build_224px"]
        print(
            f"  builder: {b['clips_per_s']:.2f} clips/s, {b['frames_per_s']:.0f} frames/s, "
            f"{b['write_MB_per_s']:.1f} MB/s written at 224 px; 2,700 RAER clips in about "
            f"{b['projected_raer_minutes']:.0f} min"
        )
    if "feature_cache" in results:
        f = results["feature_cache"]
        print(
            f"    cache: built {f['build_frames_per_s']:.1f} frames/s (ViT-B/32, "
            f"{f['image_size']} px, flips {'on' if f['flipped'] else 'off'}); train step "
            f"{f['cache_step_s'] * 1e3:.1f} ms from the cache vs {f['pixel_step_s']:.2f} s from "
            f"pixels (frozen encoder, batch {f['batch_clips']} x {f['frames_per_clip']} frames, "
            f"input included): a RAER epoch in {f['cache_epoch_s']:.0f} s vs "
            f"{f['pixel_epoch_s'] / 60:.0f} min, {f['epoch_speedup']:.0f}x"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


def main() -> None:
    app.run(run)


if __name__ == "__main__":
    main()
