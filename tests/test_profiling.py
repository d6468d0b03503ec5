"""caer_jax.profiling, which `caer_jax.bench --profile_dir` uses on a GPU: a trace of the steps,
and device time summed by operation name (host events left out)."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from caer_jax import profiling


def test_busiest_ops_sums_device_time_by_name_and_leaves_the_host_out(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "gemm", "dur": 30.0},
        {"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 10.0},
        {"ph": "X", "pid": 1, "name": "gemm", "dur": 20.0},
        {"ph": "i", "pid": 1, "name": "marker"},  # an instant: no duration
        {"ph": "X", "pid": 7, "name": "PjitFunction(step)", "dur": 500.0},
    ]
    trace = tmp_path / "vm.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    busy = profiling.busiest_ops(trace, top=1)
    assert busy["device_busy_us"] == 60.0
    assert busy["top"] == [{"name": "gemm", "us": 50.0, "share": pytest.approx(50 / 60)}]


def test_trace_steps_runs_the_step_and_writes_a_trace(tmp_path):
    calls = []
    square = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))

    def step():
        calls.append(1)
        return square(x)

    trace = profiling.trace_steps(step, str(tmp_path), steps=3)
    assert len(calls) == 1 + 3  # one outside the trace, so compilation is not in it
    assert trace is not None and trace.is_file()
    # On a CPU host every event is the host's: no device time.
    assert profiling.busiest_ops(trace)["device_busy_us"] == 0
