"""caer_jax.plan: the training loop's programs compiled by libtpu's TPU compiler for TPU slices
this machine does not have (single- and multi-host), with memory, collectives and refusals.

Each compiled plan runs in its own process (`python -m caer_jax.plan`), as a user runs it; the
compile-heavy ones are module fixtures shared by the tests that read them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caer_jax import hlo, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = "--config=configs/synthetic_tiny.py:scratch"
# A global batch whose train step needs more than a v5e chip's 16 GiB: the compiler refuses it
# (57.6 GB needed; 16384 clips fit, with a peak of 15.7 GB, since each chip encodes its own
# clips' frames).
TOO_LARGE = 65536


def _plan(*args, out: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "caer_jax.plan", "--compilation_cache=", *args]
    if out is not None:
        command.append(f"--out={out}")
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- no compiler


def test_libtpu_is_installed():
    # The compile tests below need the TPU compiler; `make test` installs it (the `tpu` extra).
    # Without it they fail rather than skip: planning is a feature, not an option of the suite.
    assert plan._libtpu_version() is not None, "libtpu missing: pip install -e '.[tpu]'"


@pytest.mark.parametrize(
    "name, chip, topology",
    [
        ("v4-8", "v4", "v4:2x2x1"),
        ("v4-16", "v4", "v4:2x2x2"),
        ("v5litepod-16", "v5e", "v5e:4x4"),
        ("v5p-32", "v5p", "v5p:2x2x4"),
        ("v6e-8", "v6e", "v6e:2x4"),
        ("v5e:2x2", "v5e", "v5e:2x2"),
        ("v5:2x2x1", "v5p", "v5p:2x2x1"),
    ],
)
def test_accelerator_types_and_topology_names_resolve(name, chip, topology):
    resolved_chip, resolved = plan.resolve_topology(name)
    assert (resolved_chip.name, resolved) == (chip, topology)


@pytest.mark.parametrize("name", ["v9-8", "v4-12", "v5e:2y2", "tpu", "v3:2x2"])
def test_unknown_topologies_are_refused(name):
    with pytest.raises(plan.errors.BadInputError, match="--topology"):
        plan.resolve_topology(name)


# An excerpt of a compiled TPU program's as_text(): an asynchronous all-gather (operands, results
# and contexts in one tuple), a combined all-reduce, and a while loop of known trip count whose
# body reduce-scatters; the *-done halves are not counted again.
_HLO = """\
HloModule jit_train_step, is_scheduled=true

%body.1 (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p = (s32[], f32[64,64]{1,0:T(8,128)}) parameter(0)
  %reduce-scatter.3 = f32[16,64]{1,0:T(8,128)} reduce-scatter(%x), channel_id=3, dimensions={0}
  ROOT %t = (s32[], f32[64,64]) tuple(%i, %x)
}

ENTRY %main.9 (Arg_0.1: f32[64,64], /*index=1*/Arg_1.2: u8[8,8,64,64,3]) -> f32[64,64] {
  %all-gather-start = ((f32[16,64]{1,0:T(8,128)}), f32[64,64]{1,0:T(8,128)}, u32[]{:S(2)}) all-gather-start(%Arg_0.1), channel_id=1, dimensions={0}
  %all-gather-done = f32[64,64]{1,0:T(8,128)} all-gather-done(%all-gather-start)
  %all-reduce.7 = (f32[]{:T(128)}, f32[256,64]{0,1:T(8,128)}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %while.2 = (s32[], f32[64,64]) while(%t0), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = f32[64,64]{1,0} copy(%all-gather-done)
}
"""


def test_collectives_counts_kinds_bytes_and_loop_iterations():
    assert hlo.collectives(_HLO) == {
        "all-gather": {"count": 1, "bytes": 64 * 64 * 4},
        "all-reduce": {"count": 1, "bytes": 4 + 256 * 64 * 4},
        "reduce-scatter": {"count": 4, "bytes": 4 * 16 * 64 * 4},
    }


def test_without_libtpu_one_error_line():
    # libtpu made unimportable in that process, and no TPU_LIBRARY_PATH (importing libtpu, as
    # importing jax here did, sets it): jax finds no TPU compiler to load.
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    script = (
        "import sys; sys.modules['libtpu'] = None; from caer_jax import plan; "
        "sys.argv = ['plan', '--topology=v5e:2x2', '--config=configs/synthetic_tiny.py:scratch', "
        "'--compilation_cache=']; plan.main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert out.returncode == 2, out.stderr
    (line,) = _error_lines(out.stderr)
    assert "libtpu is not installed" in line and "[tpu]" in line
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- compiled plans
# One plan (one process) per test, so that parallel workers never compile the same one twice.


def _compiled_plan(tmp_path, *args, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "plan.json"
    run = _plan(TINY, *args, out=out, env=env)
    assert out.exists(), run.stderr[-3000:]
    return run, json.loads(out.read_text())


def _row(result: dict, program: str, batch: int) -> dict:
    (row,) = [r for r in result["rows"] if r["program"] == program and r["batch"] == batch]
    return row


@pytest.mark.slow  # a TPU compile
def test_single_host_data_parallel_step_fits_and_all_reduces_gradients(tmp_path):
    run, result = _compiled_plan(tmp_path, "--topology=v5litepod-4", "--batches=8", "--breakdown")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (result["topology"], result["chips"], result["hosts"]) == ("v5e:2x2", 4, 1)
    assert result["mesh"] == {"data": 4, "fsdp": 1}
    assert result["state_bytes_per_chip"] == result["state_bytes"]  # all replicated
    train = _row(result, "train", 8)
    memory = train["memory"]
    assert train["fits"] and 0 < memory["total"] <= plan.CHIPS["v5e"].hbm_bytes
    # The donated state comes back in the same buffers; arguments hold the whole state per chip.
    assert memory["aliased"] > 0 and memory["arguments"] >= result["state_bytes_per_chip"]
    # Data parallelism: every chip holds all parameters and sums the gradients of all chips (or,
    # where smaller, of an activation they come from: the text features' [classes, width]
    # instead of the prompt path's parameters), with the loss and accuracy.
    assert "all-gather" not in train["collectives"]
    trainable = result["trainable_params_bytes_per_chip"]
    assert 0.9 * trainable < train["collectives"]["all-reduce"]["bytes"] < trainable + 1024
    assert train["flops"] > 0 and train["roofline"]["step_s"] > 0
    assert train["predicted_clips_per_s_slice"] == pytest.approx(
        4 * train["predicted_clips_per_s_per_chip"]
    )
    evaluation = _row(result, "eval", 8)
    assert evaluation["fits"] and evaluation["memory"]["total"] < memory["total"]
    assert "| train | 8 | yes |" in run.stdout
    # --breakdown: the parts account for the compiler's count, each a part of the model; beside
    # the minimum. The per-op count charges every operand whole, the compiler a fusion's reads
    # as it makes them: here 11 % above its total (the paper config on v4-8: 3 % below in
    # float32, 4 % above in bfloat16).
    parts = train["breakdown"]
    counted = sum(p["bytes_forward"] + p["bytes_backward"] + p["copies"] for p in parts.values())
    assert 0.85 * train["bytes_accessed"] < counted < 1.15 * train["bytes_accessed"]
    assert 0 < train["bytes_accessed_in_hbm"] <= counted
    assert {"image encoder: attention", "image encoder: MLP matmuls", "collectives"} <= set(parts)
    # the parts count matmul FLOPs; the compiler also counts elementwise ones, a larger share of
    # this tiny model than of ViT-B/32 (whose matmuls are within 0.3 % of its total)
    assert 0.8 * train["flops"] < sum(p["flops"] for p in parts.values()) <= train["flops"]
    assert train["bytes_over_minimum"] == pytest.approx(
        train["bytes_accessed"] / train["minimum"]["total"]
    )
    assert "analytic minimum" in run.stdout and "| image encoder: attention |" in run.stdout
    # no libtpu start-up noise on this TPU-less machine, only the one line that says so
    assert "Failed to find host bounds" not in run.stderr
    assert "unexpected worker hostname" not in run.stderr


@pytest.mark.slow  # a TPU compile
def test_too_large_batch_is_a_row_with_the_compilers_figures(tmp_path):
    run, result = _compiled_plan(
        tmp_path,
        "--topology=v5e:2x2",
        f"--batches={TOO_LARGE}",
        "--programs=train",
        "--fail_if_not_fits",
    )
    (row,) = result["rows"]
    assert row["fits"] is False
    assert row["needed_bytes"] > row["available_bytes"] > 0
    assert row["available_bytes"] <= plan.CHIPS["v5e"].hbm_bytes
    # --fail_if_not_fits: the table and JSON first, then one error line and status 2.
    assert run.returncode == 2
    (line,) = _error_lines(run.stderr)
    assert f"train step of batch {TOO_LARGE} needs" in line and "GB available" in line
    assert "Traceback" not in run.stderr
    assert f"| train | {TOO_LARGE} | no: needs" in run.stdout


@pytest.mark.slow  # a TPU compile
def test_multi_host_fsdp_gathers_parameters_and_holds_a_share(tmp_path):
    # Compiled without v4's on-chip CMEM staging: the compiler's options in LIBTPU_INIT_ARGS
    # reach the program (no array in memory space 3) and the plan records them.
    cmem_off = "--xla_tpu_cmem_memory_space_assignment=false"
    run, result = _compiled_plan(
        tmp_path,
        "--topology=v4:2x2x2",
        "--batches=8",
        "--programs=train",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=8",
        f"--hlo_dir={tmp_path}",
        f"--compilation_cache={tmp_path / 'cache'}",
        env={**os.environ, "LIBTPU_INIT_ARGS": cmem_off},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Nothing stored in a persistent compilation cache: a compile-only client could not load it.
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert result["libtpu_init_args"] == cmem_off
    assert f"LIBTPU_INIT_ARGS={cmem_off}" in run.stdout
    assert "S(3)" not in (tmp_path / "train_8.hlo.txt").read_text()
    assert (result["chips"], result["hosts"]) == (8, 2)
    assert result["mesh"] == {"data": 1, "fsdp": 8}
    train = _row(result, "train", 8)
    assert train["fits"] and train["memory"]["total"] <= plan.CHIPS["v4"].hbm_bytes
    # FSDP: the large leaves are split over the chips and gathered where they are used. (The
    # compiler's argument bytes are no measure of that here: the tiled layouts pad the tiny
    # model's small leaves, e.g. a [64] vector to 128 lanes, to twice its logical state.)
    assert result["state_bytes_per_chip"] < 0.6 * result["state_bytes"]
    assert train["collectives"]["all-gather"]["count"] > 0


def test_unknown_topology_of_libtpu_is_one_error_line():
    out = _plan(TINY, "--topology=v5e:3x7")
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = _error_lines(out.stderr)
    assert "--topology=v5e:3x7" in line and "libtpu" in line


@pytest.mark.parametrize(
    "message, expected",
    [
        (
            "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (36.77G) exceeds available HBM (15.75G).",
            (round(36.77 * 2**30), round(15.75 * 2**30)),
        ),
        (
            "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
            "space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.",
            (round(20.5 * 2**30), round(15.75 * 2**30)),
        ),
        ("INTERNAL: something else", None),
    ],
)
def test_refusal_bytes_reads_both_forms_of_the_compilers_message(message, expected):
    assert plan.refusal_bytes(message) == expected


# ----------------------------------------------------------------------------- fitting


def test_largest_fitting_batch_bisects_to_the_last_multiple_that_fits():
    asked = []

    def fits(batch):
        asked.append(batch)
        return batch <= 168

    assert plan.largest_fitting_batch(fits, unit=4, start=8) == 168
    # doubling 8 .. 256, then bisection between 128 and 256 in steps of 4: 5 more compiles
    assert asked[:6] == [8, 16, 32, 64, 128, 256] and len(asked) <= 6 + 5
    assert plan.largest_fitting_batch(lambda b: False, unit=4, start=8) == 0


def _compiled_on_cpu_peak() -> tuple[dict, int]:
    import jax
    import jax.numpy as jnp

    jitted = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
    args = (jax.ShapeDtypeStruct((256, 512), jnp.float32),)
    probe = plan.plan_program("train", jitted, args, chip=plan.CHIPS["v5e"], batch_size=8, chips=1)
    return (jitted, args), probe["memory"]["peak"]


@pytest.mark.parametrize("spare", [-1, 0])
def test_a_program_fits_by_the_compilers_peak_not_by_the_sum_of_its_buffers(spare):
    (jitted, args), peak = _compiled_on_cpu_peak()
    chip = plan.dataclasses.replace(plan.CHIPS["v5e"], hbm_bytes=peak + spare)
    row = plan.plan_program("train", jitted, args, chip=chip, batch_size=8, chips=1)
    m = row["memory"]
    # the peak of live buffers is below their sum here: the sum would refuse what fits
    assert 0 < m["peak"] < m["arguments"] + m["outputs"] + m["temporaries"]
    assert row["fits"] is (spare >= 0)
