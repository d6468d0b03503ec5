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
import numpy as np
from absl import flags

from caer_jax import (
    bench_end_to_end,
    cli,
    compilation,
    config_files,
    errors,
    optim,
    profiling,
    sharding,
    steps,
)
from caer_jax import state as state_lib
from caer_jax.models import caer

RAER_CLIPS = 2700
RAER_TRAIN_CLIPS = RAER_CLIPS * 4 // 5  # train is about 4x test


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "out": flags.DEFINE_string("out", None, "Write the figures to this JSON file too."),
        "storage": flags.DEFINE_bool(
            "storage",
            False,
            "Only the storage figures: each encoding of the RAER builder on photographs, through "
            "the input pipeline (caer_jax/bench_storage.py; needs scikit-image).",
        ),
        "repeats": flags.DEFINE_integer("repeats", 5, "Timed calls per measurement."),
        "paper_batches": flags.DEFINE_list(
            "paper_batches", ["8"], "Clips per step at the paper geometry (each is measured)."
        ),
        "skip_paper": flags.DEFINE_bool(
            "skip_paper", False, "Skip the (slow on CPU) ViT-B/32 geometry."
        ),
        "pipeline_batches": flags.DEFINE_integer(
            "pipeline_batches", 40, "Batches timed in the pipeline."
        ),
        "build_clips": flags.DEFINE_integer(
            "build_clips", 12, "RAER-length clips to build (0: skip)."
        ),
        "skip_data": flags.DEFINE_bool(
            "skip_data",
            False,
            "Model figures only (no TFDS/grain needed, e.g. on an accelerator host).",
        ),
        "matmul_size": flags.DEFINE_integer(
            "matmul_size", 4096, "Side of the reference matmul (8192 saturates an H100/H200)."
        ),
        "paper_dtypes": flags.DEFINE_list(
            "paper_dtypes", ["float32"], "Compute dtypes of the ViT-B/32 runs (each is measured)."
        ),
        "profile_dir": flags.DEFINE_string(
            "profile_dir",
            "",
            "Write a jax.profiler trace (with a Perfetto JSON) of a few steps of the first "
            "paper run here, and print the device's busiest operations.",
        ),
        "end_to_end": flags.DEFINE_bool(
            "end_to_end",
            False,
            "Also run the training loop at the paper geometry (caer_jax/bench_end_to_end.py): "
            "start-up cold and warm, training and eval clips/s with the pipeline, step alone, "
            "pipeline per core.",
        ),
        "data_dir": flags.DEFINE_string(
            "data_dir",
            "",
            "End to end: a TFDS data_dir with raer/224px built (default: synthetic).",
        ),
        "e2e_clips": flags.DEFINE_integer(
            "e2e_clips", 24, "End to end: synthetic RAER-length clips."
        ),
        "e2e_batch": flags.DEFINE_integer(
            "e2e_batch", 2, "End to end: global batch (clips per step)."
        ),
        "e2e_epochs": flags.DEFINE_integer("e2e_epochs", 1, "End to end: training epochs per run."),
        "e2e_workers": flags.DEFINE_list(
            "e2e_workers",
            ["0", "1", "2"],
            "End to end: grain worker counts of the pipeline figures.",
        ),
        "e2e_repeat": flags.DEFINE_integer(
            "e2e_repeat",
            1,
            "End to end: store every clip this many times (many steps from a small carried build).",
        ),
        "e2e_pipeline_batches": flags.DEFINE_integer(
            "e2e_pipeline_batches", 24, "End to end: batches timed per pipeline worker count."
        ),
        "feature_cache": flags.DEFINE_bool(
            "feature_cache",
            False,
            "Also measure the feature cache against pixels (frozen encoder).",
        ),
        "cache_clips": flags.DEFINE_integer(
            "cache_clips", 10, "Synthetic clips for --feature_cache."
        ),
        "pixel_steps": flags.DEFINE_integer(
            "pixel_steps", 2, "Timed pixel-path steps (--feature_cache)."
        ),
        "cache_steps": flags.DEFINE_integer(
            "cache_steps", 30, "Timed cached steps (--feature_cache)."
        ),
    }


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


def random_batch(config: ml_collections.ConfigDict, batch_size: int, mesh) -> dict:
    """A global batch as the input pipeline makes it: uint8 pixels, labels, mask, indices."""
    from caer_jax.data import pipeline

    shape = (
        batch_size,
        config.data.num_segments,
        config.data.image_size,
        config.data.image_size,
        3,
    )
    rng = np.random.default_rng(0)
    host = {
        "face": rng.integers(0, 256, shape, np.uint8),
        "context": rng.integers(0, 256, shape, np.uint8),
        "label": (np.arange(batch_size) % 5).astype(np.int32),
        "mask": np.ones(batch_size, np.bool_),
        "index": np.arange(batch_size, dtype=np.int32),
    }
    return pipeline.global_batch(host, mesh)


_PARAMS: dict = {}


def step_flops(config: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int) -> float:
    """FLOPs of one train step as XLA counts them for the host CPU (lowered, not compiled).

    A GPU compilation's own count leaves out the cuBLAS GEMM calls (an H200 reported 135 GFLOP
    for a step of 6.8 TFLOP), and a GPU lowering has no cost analysis; the computation is the
    same on every backend.
    """
    from caer_jax import checkpoint, trainer

    mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1), sharding.MESH_AXES)
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    setup = trainer.TrainingSetup.create(config, model, mesh, steps_per_epoch)
    state = checkpoint.with_shardings(setup.abstract, setup.state_shardings)
    clip = (batch_size, config.data.num_segments, config.data.image_size, config.data.image_size, 3)
    shapes = {
        "face": (clip, np.uint8),
        "context": (clip, np.uint8),
        "label": ((batch_size,), np.int32),
        "mask": ((batch_size,), np.bool_),
        "index": ((batch_size,), np.int32),
    }
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for k, (shape, dtype) in shapes.items()
    }
    cost = setup.step_fn.lower(state, batch, setup.dropout_rng).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _initial_params(setup, config: ml_collections.ConfigDict):
    """Random parameters, initialised once per geometry: they do not depend on the compute
    dtype or the batch, and the init program of a random ViT-B is slow to compile."""
    model = config.model.to_dict()
    for key in ("dtype", "remat"):
        model.pop(key)
    key = json.dumps([model, config.data.num_segments, config.seed], sort_keys=True, default=str)
    if key not in _PARAMS:
        _PARAMS[key] = caer.init_params(setup.model, config.model, setup.init_rng)
    return _PARAMS[key]


def bench_model(
    config: ml_collections.ConfigDict,
    batch_size: int,
    repeats: int,
    reference_rate: Callable[[], float],
    steps_per_epoch: int = 100,
    profile_dir: str = "",
) -> dict:
    """Train-step and eval-step figures of `config`'s model on random clips.

    The programs are the training loop's own (trainer.TrainingSetup on config.mesh over all
    devices), so with the persistent compilation cache of a run of the same config they are not
    compiled again. The utilisation divides by the higher of two `reference_rate()`
    measurements taken right before and right after the timed steps: a shared or throttled host
    changes speed within minutes, and the higher reference never flatters the ratio.
    """
    from caer_jax import trainer

    config = ml_collections.ConfigDict(config.to_dict())
    config.model.clip.source = "random"  # speed does not depend on the weights' values
    config.train.batch_size = batch_size
    mesh = sharding.make_mesh(config.mesh)
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    setup = trainer.TrainingSetup.create(config, model, mesh, steps_per_epoch)
    state = setup.initial_state(config, _initial_params(setup, config))
    batch = random_batch(config, batch_size, mesh)
    compiled = setup.step_fn.lower(state, batch, setup.dropout_rng).compile()
    flops = step_flops(config, batch_size, steps_per_epoch)
    holder = [state]  # the step donates its input state

    def step():
        holder[0], step_metrics = compiled(holder[0], batch, setup.dropout_rng)
        return step_metrics["loss"]

    rate_before = reference_rate()
    step_time = median_seconds(step, repeats)
    peak = max(rate_before, reference_rate())
    profile = None
    if profile_dir:
        trace = profiling.trace_steps(step, profile_dir, steps=5)
        profile = profiling.busiest_ops(trace) if trace else {"error": "no Perfetto trace"}
        profile["steps"] = 5
    params = holder[0].params
    eval_time = median_seconds(lambda: setup.eval_fn(params, batch)["probs"], repeats)
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
        **({"profile": profile} if profile else {}),
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


def run(argv: list[str], flag: cli.Flags) -> None:
    if len(argv) > 1:
        raise errors.BadInputError(f"unexpected arguments: {' '.join(argv[1:])}")
    if flag.storage.value:
        from caer_jax import bench_storage  # TFDS and grain, which --skip_data does without

        results = bench_storage.figures()
        print(json.dumps(results, indent=1), flush=True)
    else:
        results = _measured(flag)
    if flag.out.value:
        with open(flag.out.value, "w") as f:
            json.dump(results, f, indent=2)


def _measured(flag: cli.Flags) -> dict:
    """The speed figures (the module docstring's), printed."""
    with tempfile.TemporaryDirectory(prefix="caer_bench_") as scratch:
        # A compilation cache of this run alone, empty at the start: the end-to-end cold start
        # is cold, and the step timed here is the same program as the training run's (a hit).
        cache = Path(scratch) / "compilation_cache"
        compilation.enable_persistent_cache(str(cache))
        results = measure(Path(scratch), cache, flag)
    report(results)
    return results


def measure(scratch: Path, cache: Path, flag: cli.Flags) -> dict:
    """Every figure the flags (of define_flags) ask for; `scratch` is a temporary folder, `cache`
    the persistent compilation cache this process uses."""
    reference = functools.partial(
        matmul_flops_per_second, n=flag.matmul_size.value, repeats=flag.repeats.value
    )
    results = {}
    if flag.end_to_end.value:
        # First, before this process starts JAX's backend: the training processes it spawns must
        # have the accelerator to themselves, as a real run does. JAX preallocates 75 % of a
        # GPU's memory in the first process to use it, which left the training process too
        # little to autotune its step on an H100 (README, "Open on the GPU host").
        results["end_to_end"] = bench_end_to_end.run(
            scratch,
            cache,
            data_dir=flag.data_dir.value or None,
            num_clips=flag.e2e_clips.value,
            batch_size=flag.e2e_batch.value,
            epochs=flag.e2e_epochs.value,
            dtype=flag.paper_dtypes.value[0],
            worker_counts=[int(w) for w in flag.e2e_workers.value],
            pipeline_batches=flag.e2e_pipeline_batches.value,
            repeat_clips=flag.e2e_repeat.value,
            measure_step=lambda config, steps_per_epoch: bench_model(
                config,
                flag.e2e_batch.value,
                max(2, flag.repeats.value // 2),
                functools.partial(reference, flag.paper_dtypes.value[0]),
                steps_per_epoch,
            ),
        )
        print("\n".join(bench_end_to_end.describe(results["end_to_end"])), flush=True)
    peak = reference("float32")
    results |= {
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "host_allocator": host_allocator(),
        "matmul_flops_per_s": peak,
        "tiny": bench_model(
            config_files.load("synthetic_tiny").get_config("scratch"),
            8,
            flag.repeats.value,
            functools.partial(reference, "float32"),
        ),
    }
    if flag.feature_cache.value:
        results["feature_cache"] = bench_feature_cache(
            config_files.load("clip_caer_b32").get_config(),
            num_clips=flag.cache_clips.value,
            pixel_steps=flag.pixel_steps.value,
            cache_steps=flag.cache_steps.value,
        )
    print(
        f"device {results['device']} x{results['num_devices']} ({results['host_allocator']} "
        f"malloc): matmul {peak / 1e9:.1f} GFLOP/s"
    )
    print_model("tiny", results["tiny"])
    if not flag.skip_paper.value:
        results["paper_b32"] = []
        for dtype, batch in itertools.product(flag.paper_dtypes.value, flag.paper_batches.value):
            paper = config_files.load("clip_caer_b32").get_config()
            paper.model.dtype = dtype
            profile = flag.profile_dir.value if not results["paper_b32"] else ""
            results["paper_b32"].append(
                bench_model(
                    paper,
                    int(batch),
                    max(2, flag.repeats.value // 2),
                    functools.partial(reference, dtype),
                    profile_dir=profile,
                )
            )
            print_model("paper_b32", results["paper_b32"][-1])
    if not flag.skip_data.value:
        results["pipeline"] = bench_pipeline(
            config_files.load("synthetic_tiny").get_config(), flag.pipeline_batches.value
        )
    if flag.build_clips.value and not flag.skip_data.value:
        results["build_224px"] = bench_build(flag.build_clips.value)
    return results


def print_model(name: str, r: dict) -> None:
    """One model figure's line (printed as soon as it is measured), and its profile if any."""
    print(
        f"{name:>9} ({r['dtype']}, batch {r['batch_clips']}): train step "
        f"{r['train_step_s'] * 1e3:.1f} ms ({r['train_clips_per_s']:.1f} clips/s), "
        f"{r['train_step_flops'] / 1e9:.1f} GFLOP/step, "
        f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{100 * r['utilisation_of_matmul_rate']:.0f}% of the {r['dtype']} matmul's "
        f"{r['reference_matmul_flops_per_s'] / 1e9:.0f}; eval {r['eval_clips_per_s']:.1f} clips/s",
        flush=True,
    )
    if "top" in r.get("profile", {}):
        busy = r["profile"]["device_busy_us"] / r["profile"]["steps"] / 1e3
        print(f"  device busy {busy:.1f} ms per step; busiest operations:")
        for op in r["profile"]["top"]:
            print(f"    {100 * op['share']:5.1f} %  {op['name'][:110]}")


def report(results: dict) -> None:
    """Prints the figures of `measure` not printed as they were measured."""
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


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
