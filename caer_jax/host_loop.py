"""What the training loop keeps on the host without making the device wait.

`PendingMetrics` leaves each step's metrics on the device until the loop needs them (a log line,
an epoch's end, a checkpoint): one transfer for many steps instead of a sync per step. The train
step's in-graph guard already keeps a non-finite step from touching the state, so reading its
flag a few steps late only delays the stop; the error still names the step and its clips.

`LoopTimer` measures what the step figure hides: time from process start to the first finished
step, steady-state training rate with the data pipeline, time in evaluation and time the loop
was blocked by checkpoint saves. The loop writes these to `speed.json` in the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass
class StepRecord:
    step: int
    metrics: dict  # host values once read
    clips: np.ndarray  # record indices of this process's rows of the batch


class PendingMetrics:
    """Step metrics on the device, read back in one transfer when `read()` is called.

    At most `max_in_flight` steps are left unfinished: adding a step waits (without a transfer)
    for the step that many places back, so the host never queues unbounded work and memory.
    """

    def __init__(self, max_in_flight: int = 2):
        self._max_in_flight = max(1, max_in_flight)
        self._pending: list[StepRecord] = []

    def add(self, step: int, device_metrics: dict, clips: np.ndarray) -> None:
        self._pending.append(StepRecord(step, device_metrics, clips))
        if len(self._pending) > self._max_in_flight:
            jax.block_until_ready(self._pending[-1 - self._max_in_flight].metrics["finite"])

    def read(self) -> list[StepRecord]:
        """The pending steps with host metrics, in step order; the buffer is emptied."""
        if not self._pending:
            return []
        values = jax.device_get([r.metrics for r in self._pending])
        records = [
            StepRecord(r.step, v, r.clips) for r, v in zip(self._pending, values, strict=True)
        ]
        self._pending = []
        return records


def process_start_time() -> float:
    """Wall-clock time (time.time()) at which this process started, from /proc on Linux;
    elsewhere the time this module was imported."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, IndexError, ValueError):
        return _IMPORT_TIME
    return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")


_IMPORT_TIME = time.time()


class LoopTimer:
    """Wall-clock accounting of a training run (this process)."""

    def __init__(self, clips_per_step: int):
        self.clips_per_step = clips_per_step
        self.process_start = process_start_time()
        self.first_step_done: float | None = None
        self.first_step: int | None = None
        self.eval_seconds = 0.0
        self.eval_clips = 0
        self.checkpoint_seconds = 0.0  # in save calls during training
        self.final_wait_seconds = 0.0  # for the last writes to finish, after the last step
        self.end: float | None = None
        self.last_step: int | None = None

    def first_step_finished(self, step: int, outputs: Any) -> None:
        """Call once, after the first step of this process: waits for it to finish."""
        jax.block_until_ready(outputs)
        self.first_step_done = time.time()
        self.first_step = step

    def evaluated(self, seconds: float, clips: int) -> None:
        self.eval_seconds += seconds
        self.eval_clips += clips

    @contextlib.contextmanager
    def checkpointing(self):
        start = time.time()
        yield
        self.checkpoint_seconds += time.time() - start

    def finished(self, step: int, outputs: Any) -> None:
        jax.block_until_ready(outputs)
        self.end = time.time()
        self.last_step = step

    def summary(self) -> dict:
        out: dict[str, Any] = {"clips_per_step": self.clips_per_step}
        if self.first_step_done is not None:
            out["process_start_to_first_step_s"] = self.first_step_done - self.process_start
            out["first_step_done_unix_time"] = self.first_step_done
        if self.end is not None and self.last_step is not None and self.first_step is not None:
            steps = self.last_step - self.first_step
            # Steady state: after the first (compiling) step, evaluation and saves left out.
            seconds = self.end - self.first_step_done - self.eval_seconds - self.checkpoint_seconds
            out["steady_steps"] = steps
            out["steady_train_seconds"] = seconds
            if steps > 0 and seconds > 0:
                out["train_clips_per_s"] = steps * self.clips_per_step / seconds
        out["eval_seconds"] = self.eval_seconds
        out["eval_clips"] = self.eval_clips
        if self.eval_seconds > 0:
            out["eval_clips_per_s"] = self.eval_clips / self.eval_seconds
        out["checkpoint_blocked_seconds"] = self.checkpoint_seconds
        out["checkpoint_final_wait_seconds"] = self.final_wait_seconds
        return out
