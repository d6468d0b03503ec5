"""Speed figures: `python -m caer_jax.bench [--config=configs/synthetic_tiny.py] [--out=bench.json]`.

Prints and writes (JSON) the measured large-matmul FLOP/s of this machine, and for the tiny and
the paper geometry (ViT-B/32, 16 frames, two streams): train-step time, clips/s, model FLOPs per
step from XLA's cost analysis and their ratio to the matmul rate; plus eval clips/s.
Timings are medians over repeated calls after compilation, with inputs already on device.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from caer_jax import optim, train
from caer_jax import state as state_lib
from caer_jax.models import caer
from configs import clip_caer_b32, synthetic_tiny

_OUT = flags.DEFINE_string("out", None, "Write the figures to this JSON file too.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 8, "Clips per step at the paper geometry.")
_SKIP_PAPER = flags.DEFINE_bool("skip_paper", False, "Skip the (slow on CPU) ViT-B/32 geometry.")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 4096, repeats: int = 5) -> float:
    """Achieved float32 FLOP/s of one large square matmul: the machine's reference rate."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b), repeats)


def bench_model(
    config: ml_collections.ConfigDict, batch_size: int, repeats: int, peak: float
) -> dict:
    """Train-step and eval-step figures of `config`'s model on random clips."""
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
            train.train_step,
            model=model,
            tx=tx,
            dropout_rng=jax.random.key(1),
            streams=config.model.streams,
        )
    )
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    step_time = median_seconds(lambda: compiled(state, batch)[1]["loss"], repeats)

    def forward():
        face, context = train.stream_inputs(batch, config.model.streams)
        return model.apply({"params": params}, face, context, train=False)[0]

    eval_time = median_seconds(jax.jit(forward), repeats)
    return {
        "batch_clips": batch_size,
        "frames_per_clip": config.data.num_segments,
        "image_size": config.data.image_size,
        "streams": config.model.streams,
        "train_step_s": step_time,
        "train_clips_per_s": batch_size / step_time,
        "train_step_flops": flops,
        "achieved_flops_per_s": flops / step_time,
        "utilisation_of_matmul_rate": flops / step_time / peak,
        "eval_clips_per_s": batch_size / eval_time,
    }


def run(argv=()) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    peak = matmul_flops_per_second(repeats=_REPEATS.value)
    results = {
        "device": str(jax.devices()[0].device_kind),
        "num_devices": jax.device_count(),
        "matmul_flops_per_s": peak,
        "tiny": bench_model(synthetic_tiny.get_config(), 8, _REPEATS.value, peak),
    }
    if not _SKIP_PAPER.value:
        results["paper_b32"] = bench_model(
            clip_caer_b32.get_config(), _PAPER_BATCH.value, max(2, _REPEATS.value // 2), peak
        )
    print(f"device {results['device']} x{results['num_devices']}: matmul {peak / 1e9:.1f} GFLOP/s")
    for name in ("tiny", "paper_b32"):
        if name in results:
            r = results[name]
            print(
                f"{name:>9}: train step {r['train_step_s'] * 1e3:.1f} ms "
                f"({r['train_clips_per_s']:.1f} clips/s), {r['train_step_flops'] / 1e9:.1f} GFLOP/step, "
                f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                f"{100 * r['utilisation_of_matmul_rate']:.0f}% of matmul; "
                f"eval {r['eval_clips_per_s']:.1f} clips/s"
            )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


def main() -> None:
    app.run(run)


if __name__ == "__main__":
    main()
