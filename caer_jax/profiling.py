"""A jax.profiler trace of a few steps, and where the device's time went in it.

`trace_steps` records a trace with a Perfetto JSON beside it (jax.profiler's own output, viewable
in ui.perfetto.dev or TensorBoard); `busiest_ops` reads that JSON and sums the duration of every
device operation (on GPU: kernels, by name), so a run on a lent machine can print its breakdown
without TensorBoard.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import jax


def trace_steps(step: Callable[[], object], directory: str, steps: int = 5) -> Path | None:
    """Traces `steps` calls of `step` (already compiled); returns the Perfetto JSON if written."""
    jax.block_until_ready(step())
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(steps):
            out = step()
        jax.block_until_ready(out)
    found = sorted(Path(directory).rglob("*.trace.json.gz"))
    return found[-1] if found else None


def busiest_ops(trace_json_gz: Path, top: int = 25) -> dict:
    """Device time by operation name in a Perfetto/Chrome trace written by jax.profiler.

    Device events are those of processes whose name starts with "/device:" (GPU/TPU streams);
    returns the total device-busy microseconds and the `top` names with their share.
    """
    with gzip.open(trace_json_gz, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and str(e.get("args", {}).get("name", "")).startswith("/device:")
    }
    by_name: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids:
            by_name[e.get("name", "?")] += float(e.get("dur", 0.0))
    total = sum(by_name.values())
    return {
        "device_busy_us": total,
        "top": [
            {"name": name, "us": us, "share": us / total if total else 0.0}
            for name, us in by_name.most_common(top)
        ],
    }
