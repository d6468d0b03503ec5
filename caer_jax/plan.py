"""A TPU slice planned before anyone pays for it: `python -m caer_jax.plan`.

    python -m caer_jax.plan --config=configs/clip_caer_b32.py --topology=v5e-16 \
        --batches=8,64 --out=plan.json

Compiles, ahead of time and with no TPU attached, the training loop's own programs
(`trainer.TrainingSetup`: the train step and the eval step, on the config's data x fsdp mesh, dtype,
remat and gradient accumulation) for every chip of a TPU topology, with the TPU compiler of the
installed libtpu (`pip install -e '.[tpu]'`). Per global batch and program it reports, per chip:
the memory the compiler allots (state, batch, outputs, temporaries, code) against the chip's HBM,
FLOPs and bytes accessed, every collective by kind (count and bytes) and a roofline lower bound
of the step time from the chip's published figures (CHIPS), with the clips/s that bound
predicts. A program the compiler refuses as too large for HBM is a "does not fit" row with the
compiler's needed and available bytes.

--topology takes libtpu's names (v5e:2x2, v4:2x2x2, v6e:4x4) or Cloud TPU accelerator types
(v4-8, v5litepod-16, v5p-32, v6e-16). Multi-host slices compile from this one process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from caer_jax import backend, cli, errors, hlo, optim, sharding, traffic, trainer
from caer_jax.data import feature_cache, pipeline
from caer_jax.models import caer

# The LR schedule's length does not change any program's shapes.
_STEPS_PER_EPOCH = 100
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures. Bandwidths in bytes/s; `ici_bytes_per_s` is the
    bidirectional inter-chip interconnect bandwidth of a chip (all its links together)."""

    name: str
    hbm_bytes: int
    peak_flops: float  # bf16 dense: TPUs run float32 matmuls through the bf16 MXU by default
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    megacore: bool  # two TensorCores driven as one device (libtpu's "megacore" chip config)
    source: str


GiB = 2**30
CHIPS = {
    # https://cloud.google.com/tpu/docs/v4 ("275 teraflops (bf16 or int8)", "32 GiB, 1200 GBps").
    # That page gives no ICI figure per chip; Google's "How to Scale Your Model" (TPU chapter,
    # jax-ml.github.io/scaling-book/tpus) gives v4 6 links of 4.5e10 B/s each way.
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 6 * 2 * 45e9, True, "cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GiB HBM at 819 GBps,
    # bidirectional ICI 400 GBps per chip.
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9, False, "cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GiB HBM at 2765 GBps,
    # bidirectional ICI 1200 GBps per chip.
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 1200e9, True, "cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM at 1638 GBps,
    # bidirectional ICI 800 GBps per chip.
    "v6e": Chip("v6e", 32 * 10**9, 918e12, 1638e9, 800e9, False, "cloud.google.com/tpu/docs/v6e"),
}
# Accelerator-type prefixes (gcloud --accelerator-type) -> chip, and whether the type counts
# TensorCores (two per v4 / v5p chip) rather than chips.
_ACCELERATOR_PREFIXES = {
    "v4": ("v4", True),
    "v5p": ("v5p", True),
    "v5litepod": ("v5e", False),
    "v5e": ("v5e", False),
    "v6e": ("v6e", False),
}
# Slice shapes by chip count, as Cloud TPU builds them (2D torus for v5e / v6e, 3D for v4 / v5p).
_SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
_SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
}


def resolve_topology(name: str) -> tuple[Chip, str]:
    """(chip, libtpu topology name) of a topology name (v5e:2x2) or accelerator type (v5e-4)."""
    if ":" in name:
        family, shape = name.split(":", 1)
        family = "v5p" if family == "v5" else family
        if family not in CHIPS or not re.fullmatch(r"\d+(x\d+)+", shape):
            raise errors.BadInputError(
                f"--topology={name}: expected CHIP:SHAPE with CHIP one of {', '.join(CHIPS)} "
                f"(e.g. v5e:2x2, v4:2x2x2) or an accelerator type (e.g. v4-8, v5litepod-16)"
            )
        return CHIPS[family], f"{family}:{shape}"
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if not match or match.group(1) not in _ACCELERATOR_PREFIXES:
        raise errors.BadInputError(
            f"--topology={name}: not a topology (e.g. v5e:2x2) or accelerator type of "
            f"{', '.join(p + '-N' for p in _ACCELERATOR_PREFIXES)}"
        )
    family, counts_cores = _ACCELERATOR_PREFIXES[match.group(1)]
    chip = CHIPS[family]
    chips = int(match.group(2)) // (2 if counts_cores else 1)
    shapes = _SHAPES_3D if family in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
        sizes = ", ".join(f"{match.group(1)}-{n * (2 if counts_cores else 1)}" for n in shapes)
        raise errors.BadInputError(f"--topology={name}: no slice of that size; known: {sizes}")
    return chip, f"{family}:{shapes[chips]}"


def topology_devices(chip: Chip, topology: str) -> list:
    """The compile-only devices of `topology` (one per chip), from libtpu."""
    from jax.experimental import topologies

    options = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        with backend.quiet_libtpu():  # its first load prints start-up noise on a TPU-less host
            return list(topologies.get_topology_desc(topology, "tpu", **options).devices)
    except RuntimeError as e:  # jax's "JAX TPU support not installed", or libtpu's refusal
        if "not installed" in str(e):
            raise errors.MissingInputError(
                "libtpu is not installed: caer_jax.plan compiles with the TPU compiler of "
                "libtpu; pip install -e '.[tpu]'"
            ) from e
        raise errors.BadInputError(
            f"--topology={topology}: the installed libtpu does not know it ({errors.one_line(e)})"
        ) from e


# ----------------------------------------------------------------------------- programs


def abstract_batch(config: ml_collections.ConfigDict, model, batch_size: int, mesh) -> dict:
    """ShapeDtypeStructs of a global batch as the input pipeline makes it (uint8 pixels, or the
    feature cache's features), split over the mesh as the loop's DevicePrefetch puts it."""
    if config.data.feature_cache.enabled:
        record = feature_cache.FeatureLoader(config, model.geometry.embed_dim).padding()
    else:
        record = pipeline.ClipLoader.from_config(config).padding()
    split = sharding.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((batch_size, *v.shape), v.dtype, sharding=split)
        for k, v in record.items()
    }


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs, sharded or whole (logical sizes:
    without the padding of the TPU's tiled layouts)."""
    return sum(
        math.prod(leaf.sharding.shard_shape(leaf.shape) if leaf.sharding else leaf.shape)
        * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
    )


# ----------------------------------------------------------------------------- one program

# The TPU compiler's two refusals for memory (sizes as XLA prints them: 1024-based units):
#   "Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm. ..."
#   "Ran out of memory on HBM, the total memory required for HLO temporaries (36.77G) exceeds
#    available HBM (15.75G)."
_SIZE = r"([\d.]+)([KMGT]?)"
_TOO_LARGE = (
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE),
    re.compile(rf"required for [\w ]+\({_SIZE}\) exceeds available HBM \({_SIZE}\)"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refusal_bytes(message: str) -> tuple[int, int] | None:
    """(needed, available) bytes per chip of a TPU compiler's refusal for memory, else None."""
    for pattern in _TOO_LARGE:
        match = pattern.search(message)
        if match:
            used, used_unit, limit, limit_unit = match.groups()
            return (
                round(float(used) * _UNITS[used_unit.upper()]),
                round(float(limit) * _UNITS[limit_unit.upper()]),
            )
    return None


def plan_program(
    name: str,
    jitted,
    args: tuple,
    *,
    chip: Chip,
    batch_size: int,
    chips: int,
    hlo_dir: str = "",
    breakdown: bool = False,
):
    """The row of one program: compiled for the topology, or refused by the compiler. With
    `hlo_dir`, the compiled program's text (layouts, collectives) is written there; with
    `breakdown`, the row has its bytes and FLOPs by model part (caer_jax.traffic).

    Whether it fits is judged by the compiler's peak of live memory where the runtime reports
    one: the sum of arguments, outputs and temporaries over-counts buffers that are never live
    at the same time (and would refuse configs that fit)."""
    row: dict[str, Any] = {"program": name, "batch": batch_size}
    start = time.time()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # XlaRuntimeError; only a refusal for memory is a row
        refused = refusal_bytes(str(e))
        if refused is None:
            raise
        row.update(
            fits=False,
            compile_s=time.time() - start,
            needed_bytes=refused[0],
            available_bytes=refused[1],
            compiler_message=errors.one_line(str(e))[:400],
        )
        return row
    row["compile_s"] = time.time() - start
    m = compiled.memory_analysis()
    memory = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    # Donated inputs share their buffers with the outputs they alias.
    memory["total"] = sum(memory.values()) - 2 * memory["aliased"]
    memory["peak"] = getattr(m, "peak_memory_in_bytes", 0) or memory["total"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    accessed = float(cost.get("bytes accessed", 0.0))
    text = compiled.as_text()
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{name}_{batch_size}.hlo.txt").write_text(text)
    if breakdown:
        row["breakdown"] = {
            part: dataclasses.asdict(entry) for part, entry in traffic.breakdown(text).items()
        }
        row["on_chip_staging_bytes"] = sum(e["staged"] for e in row["breakdown"].values())
    # The compiler's count adds the traffic of on-chip memory (v4's CMEM prefetches and their
    # reassembly count twice or more); the HBM bound divides only what moves to or from HBM.
    in_hbm = float(sum(op.hbm_bytes for op in hlo.op_costs(text)))
    found = hlo.collectives(text)
    ici_bytes = sum(v["bytes"] for v in found.values())
    bounds = {
        "compute_s": flops / chip.peak_flops,
        "hbm_s": in_hbm / chip.hbm_bytes_per_s,
        "ici_s": ici_bytes / chip.ici_bytes_per_s,
    }
    step_s = max(bounds.values())
    estimate = float(cost.get("optimal_seconds", -1.0))
    row.update(
        fits=memory["peak"] <= chip.hbm_bytes,
        memory=memory,
        hbm_bytes=chip.hbm_bytes,
        flops=flops,
        bytes_accessed=accessed,
        bytes_accessed_in_hbm=in_hbm,
        collectives=found,
        roofline={**bounds, "step_s": step_s, "bound": max(bounds, key=bounds.get)[:-2]},
        compiler_estimate_s=estimate if estimate > 0 else None,
        predicted_clips_per_s_per_chip=batch_size / step_s / chips if step_s else None,
        predicted_clips_per_s_slice=batch_size / step_s if step_s else None,
    )
    return row


# ----------------------------------------------------------------------------- the plan


def check_batches(batches: Sequence[int], config, chips: int) -> None:
    accum = config.train.grad_accum_steps
    for b in batches:
        if b <= 0 or b % chips or b % accum or (b // accum) % chips:
            raise errors.BadInputError(
                f"--batches: {b} clips do not split over {chips} chips"
                + (
                    f" in {accum} micro-batches (config.train.grad_accum_steps)"
                    if accum > 1
                    else ""
                )
                + f"; give multiples of {chips * accum}"
            )


def largest_fitting_batch(fits, unit: int, start: int) -> int:
    """The largest multiple of `unit` for which `fits(batch)` holds (0 if `unit` does not fit),
    taking fitting to be monotone in the batch: doubling from `start` (rounded to a multiple of
    `unit`) until a batch does not fit, then bisection between the last that fit and that one.
    Each call of `fits` is a compilation, so the search asks about log2 of the range times."""
    low, high = 0, max(unit, start // unit * unit)
    while fits(high):
        low, high = high, 2 * high
    while high - low > unit:
        middle = (low + high) // 2 // unit * unit
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def make_plan(
    config: ml_collections.ConfigDict,
    topology: str,
    batches: Sequence[int] | None,
    programs: Sequence[str] = ("train", "eval"),
    hlo_dir: str = "",
    breakdown: bool = False,
) -> dict:
    """The plan of `config` on `topology` for each global batch (see the module docstring);
    `batches` None: the largest batch whose train step fits, found by compiling (the probes
    are in the plan's "search"). With `breakdown`, train rows have the bytes and FLOPs by model
    part and the analytic minimum of the step's traffic (caer_jax.traffic)."""
    chip, name = resolve_topology(topology)
    devices = topology_devices(chip, name)
    if batches is not None:
        check_batches(batches, config, len(devices))
    config = ml_collections.ConfigDict(config.to_dict())
    # The program does not depend on the weights' values; random ones need no download.
    config.model.clip.source = "random"
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    setup = trainer.TrainingSetup.create(config, model, mesh, _STEPS_PER_EPOCH)
    state = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        setup.abstract,
        setup.state_shardings,
    )
    plan = {
        "config": None,
        "topology": name,
        "chip": dataclasses.asdict(chip),
        "chips": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape),
        "dtype": config.model.dtype,
        "remat": config.model.remat,
        "grad_accum_steps": config.train.grad_accum_steps,
        "state_bytes": per_device_bytes(setup.abstract),  # unsharded: the whole state
        "state_bytes_per_chip": per_device_bytes(state),
        "params_bytes_per_chip": per_device_bytes(state.params),
        "trainable_params_bytes_per_chip": per_device_bytes(_trainable(state.params, config)),
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
        # the TPU compiler's options set through the environment (they change the program)
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
        "note": "predicted_* and roofline figures are predictions from a lower bound, not "
        "measurements",
        "rows": [],
    }

    def rows(batch_size: int, names: Sequence[str]) -> list[dict]:
        batch = abstract_batch(config, model, batch_size, mesh)
        compiled = {
            "train": (setup.step_fn, (state, batch, setup.dropout_rng)),
            "eval": (setup.eval_fn, (state.params, batch)),
        }
        out = []
        for program in names:
            jitted, args = compiled[program]
            logging.info("compiling the %s step for batch %d on %s", program, batch_size, name)
            row = plan_program(
                program,
                jitted,
                args,
                chip=chip,
                batch_size=batch_size,
                chips=len(devices),
                hlo_dir=hlo_dir,
                breakdown=breakdown and program == "train",
            )
            row["batch_bytes_per_chip"] = per_device_bytes(batch)
            if "breakdown" in row:
                row["minimum"] = traffic.analytic_minimum(
                    config,
                    setup.abstract.params,
                    batch_size=batch_size,
                    chips=len(devices),
                    fsdp=mesh.shape["fsdp"],
                    n_cls=model.n_cls,
                )
                row["bytes_over_minimum"] = row["bytes_accessed"] / row["minimum"]["total"]
            out.append(row)
        return out

    if batches is None:
        unit = len(devices) * config.train.grad_accum_steps
        plan["search"] = []

        def fits(batch_size: int) -> bool:
            (row,) = rows(batch_size, ["train"])
            plan["search"].append({"batch": batch_size, "fits": row["fits"]})
            return row["fits"]

        batches = [largest_fitting_batch(fits, unit, config.train.batch_size)]
        if not batches[0]:
            raise errors.BadInputError(
                f"{topology}: not even {unit} clips per step fit (config.train.grad_accum_steps "
                f"{config.train.grad_accum_steps}); try FSDP (--config.mesh.fsdp) or remat"
            )
    for batch_size in batches:
        plan["rows"] += rows(batch_size, programs)
    return plan


def _trainable(params: Any, config: ml_collections.ConfigDict) -> list:
    """The parameters that get gradients (not in optim's frozen group)."""
    groups = optim.param_groups(params, freeze_image_encoder=config.model.freeze_image_encoder)
    return [
        p
        for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(groups), strict=True)
        if g != optim.FROZEN
    ]


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- report


def _gb(n: float) -> str:
    return f"{n / GB:.2f}"


def table(plan: dict) -> str:
    """The plan as a Markdown table (one row per program and batch; figures per chip)."""
    head = (
        f"{plan['topology']}: {plan['chips']} chips, {plan['hosts']} host(s), mesh "
        f"data={plan['mesh']['data']} x fsdp={plan['mesh']['fsdp']}, {plan['dtype']}, remat "
        f"{plan['remat']}, grad_accum {plan['grad_accum_steps']}; HBM "
        f"{_gb(plan['chip']['hbm_bytes'])} GB per chip; clips/s are predictions (roofline)"
    )
    if plan.get("libtpu_init_args"):
        head += f"; LIBTPU_INIT_ARGS={plan['libtpu_init_args']}"
    lines = [
        head,
        "",
        "| program | batch | fits | GB per chip: args / out / temp / peak | TFLOP per chip "
        "| GB accessed: all / in HBM | collectives (count, MB) "
        "| bound: compute / HBM / ICI ms | compiler ms "
        "| clips/s per chip | clips/s slice | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in plan["rows"]:
        if not r["fits"] and "memory" not in r:
            lines.append(
                f"| {r['program']} | {r['batch']} | no: needs {_gb(r['needed_bytes'])} of "
                f"{_gb(r['available_bytes'])} GB | | | | | | | | | {r['compile_s']:.0f} |"
            )
            continue
        m, b = r["memory"], r["roofline"]
        found = ", ".join(
            f"{k} {v['count']}, {v['bytes'] / 1e6:.1f}" for k, v in r["collectives"].items()
        )
        estimate = r["compiler_estimate_s"]
        lines.append(
            f"| {r['program']} | {r['batch']} | {'yes' if r['fits'] else 'no'} "
            f"| {_gb(m['arguments'])} / {_gb(m['outputs'])} / {_gb(m['temporaries'])} / "
            f"{_gb(m['peak'])} | {r['flops'] / 1e12:.3f} "
            f"| {_gb(r['bytes_accessed'])} / {_gb(r['bytes_accessed_in_hbm'])} | {found or 'none'} "
            f"| {b['compute_s'] * 1e3:.2f} / {b['hbm_s'] * 1e3:.2f} / {b['ici_s'] * 1e3:.2f} "
            f"| {'-' if estimate is None else f'{estimate * 1e3:.2f}'} "
            f"| {r['predicted_clips_per_s_per_chip']:.0f} | {r['predicted_clips_per_s_slice']:.0f} "
            f"| {r['compile_s']:.0f} |"
        )
    if plan.get("search"):
        probes = ", ".join(f"{p['batch']} {'yes' if p['fits'] else 'no'}" for p in plan["search"])
        lines += ["", f"largest batch that fits, by compiling: {probes}"]
    for r in plan["rows"]:
        if "breakdown" in r:
            lines += ["", breakdown_table(r)]
    return "\n".join(lines)


def breakdown_table(row: dict, top: int = 12) -> str:
    """Where a train row's bytes go, by model part, beside the analytic minimum."""
    parts = sorted(row["breakdown"].items(), key=lambda kv: -_part_bytes(kv[1]))
    counted = sum(_part_bytes(e) for _, e in parts)
    minimum = row["minimum"]
    lines = [
        f"train step, batch {row['batch']}: {_gb(row['bytes_accessed'])} GB accessed per chip "
        f"(the compiler's count; {_gb(counted)} GB in its operations below, "
        f"{_gb(row['bytes_accessed_in_hbm'])} GB of them in HBM), analytic minimum "
        f"{_gb(minimum['total'])} GB: {row['bytes_over_minimum']:.2f}x "
        f"({row['bytes_accessed_in_hbm'] / minimum['total']:.2f}x of what is in HBM); "
        f"{_gb(row['on_chip_staging_bytes'])} GB of the operations are the compiler's moves "
        "into and out of on-chip memory",
        "",
        "| part | GB forward | GB backward | GB copies | GB | of which in HBM | TFLOP |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, e in parts[:top]:
        lines.append(
            f"| {part} | {_gb(e['bytes_forward'])} | {_gb(e['bytes_backward'])} "
            f"| {_gb(e['copies'])} | {_gb(_part_bytes(e))} | {_gb(e['in_hbm'])} "
            f"| {e['flops'] / 1e12:.3f} |"
        )
    rest = parts[top:]
    if rest:
        lines.append(
            f"| {len(rest)} more parts | | | | {_gb(sum(_part_bytes(e) for _, e in rest))} | | |"
        )
    lines += [
        "",
        "analytic minimum: "
        + "; ".join(f"{k} {_gb(v)}" for k, v in minimum.items() if k != "total")
        + " (GB)",
    ]
    return "\n".join(lines)


def _part_bytes(entry: dict) -> float:
    return entry["bytes_forward"] + entry["bytes_backward"] + entry["copies"]


def run(argv: list[str], flag: cli.Flags) -> None:
    config, topology = flag.config.value, flag.topology.value
    # No persistent compilation cache: a compile-only TPU client can store its programs but not
    # load them (jax warns that it cannot deserialize the entry, then compiles again), so a cache
    # would only fill the disk.
    cli.start(argv, persistent_cache=False, config=config, topology=topology)
    if flag.batches.value == ["max"]:
        batches = None
    else:
        try:
            batches = [int(b) for b in flag.batches.value] or [config.train.batch_size]
        except ValueError as e:
            raise errors.BadInputError(
                f"--batches={','.join(flag.batches.value)}: {e} (give clip counts, or max)"
            ) from e
    plan = make_plan(
        config,
        topology,
        batches,
        flag.programs.value,
        flag.hlo_dir.value,
        breakdown=flag.breakdown.value,
    )
    plan["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
    print(table(plan))
    if flag.out.value:
        Path(flag.out.value).parent.mkdir(parents=True, exist_ok=True)
        Path(flag.out.value).write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {flag.out.value}")
    too_large = [r for r in plan["rows"] if r["program"] == "train" and not r["fits"]]
    if flag.fail_if_not_fits.value and too_large:
        raise errors.BadInputError(
            f"{plan['config']} on {plan['topology']}: "
            + "; ".join(f"the train step of batch {r['batch']} {_shortfall(r)}" for r in too_large)
        )


def _shortfall(row: dict) -> str:
    if "needed_bytes" in row:  # refused by the compiler
        needed, available = row["needed_bytes"], row["available_bytes"]
    else:
        needed, available = row["memory"]["peak"], row["hbm_bytes"]
    return f"needs {_gb(needed)} GB per chip, {_gb(available)} GB available"


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(help_string="Config file (the training command's)."),
        "topology": flags.DEFINE_string(
            "topology",
            None,
            "TPU topology (v5e:2x2, v4:2x2x2) or accelerator type (v4-8, v5litepod-16).",
        ),
        "batches": flags.DEFINE_list(
            "batches",
            [],
            "Global batches (clips per step) to plan; empty: config.train.batch_size; max: the "
            "largest whose train step fits a chip, found by compiling (bisection).",
        ),
        "programs": flags.DEFINE_multi_enum(
            "programs",
            ["train", "eval"],
            ["train", "eval"],
            "The training loop's programs to compile.",
        ),
        "out": flags.DEFINE_string("out", "", "JSON file for the plan; empty: printed only."),
        "hlo_dir": flags.DEFINE_string(
            "hlo_dir",
            "",
            "Folder for each compiled program's optimized HLO (PROGRAM_BATCH.hlo.txt).",
        ),
        "breakdown": flags.DEFINE_bool(
            "breakdown",
            False,
            "Also give the train step's bytes and FLOPs by model part, beside the analytic "
            "minimum of its memory traffic (caer_jax.traffic).",
        ),
        "fail_if_not_fits": flags.DEFINE_bool(
            "fail_if_not_fits",
            False,
            "Exit with status 2 (after the table and JSON) when a train step does not fit a "
            "chip's HBM.",
        ),
    }


def main() -> None:
    backend.prepare_compile_only()
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
