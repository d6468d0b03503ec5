"""What the training loop keeps on the host without making the device wait.

`PendingMetrics` leaves each step's metrics on the device until the loop needs them (a log line,
an epoch's end, a checkpoint): one transfer for many steps instead of a sync per step. The train
step's in-graph guard already keeps a non-finite step from touching the state, so reading its
flag a few steps late only delays the stop; the error still names the step and its clips.

`run_steps`, `finite_losses`, `Progress` and `closing` are the parts of a loop that training and
pretraining share.

`LoopTimer` measures what the step figure hides: time from process start to the first finished
step, steady-state training rate with the data pipeline, time in evaluation and time the loop
was blocked by checkpoint saves. The loop writes these to `speed.json` in the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging


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


def run_steps(
    state: Any,
    step_fn: Callable[[Any, dict], tuple[Any, dict]],
    data_iterator: Iterator[tuple[dict, dict]],
    pending: PendingMetrics,
    *,
    start_step: int,
    total_steps: int,
    timer: LoopTimer | None = None,
) -> Iterator[tuple[int, Any]]:
    """Runs step_fn(state, batch) on the iterator's batches for steps start_step + 1 ..
    total_steps, yielding (step, new state) once each step is dispatched and its metrics are in
    `pending` (the caller reads them when it needs them)."""
    for step in range(start_step + 1, total_steps + 1):
        batch, host = next(data_iterator)
        state, step_metrics = step_fn(state, batch)
        pending.add(step, step_metrics, host["index"])
        if timer is not None and step == start_step + 1:
            timer.first_step_finished(step, step_metrics)
        yield step, state


def finite_losses(
    records: list[StepRecord], *, skip_nonfinite: bool, hint: Callable[[StepRecord], str]
) -> tuple[list[float], list[StepRecord]]:
    """The losses of the finite steps of `records`, and the records of the others; unless
    `skip_nonfinite`, the first non-finite step raises a FloatingPointError naming the step, its
    loss and gradient norm, then hint(record)."""
    losses, skipped = [], []
    for record in records:
        if record.metrics["finite"]:
            losses.append(float(record.metrics["loss"]))
        elif skip_nonfinite:
            skipped.append(record)
        else:
            raise FloatingPointError(
                f"non-finite loss ({record.metrics['loss']}) or gradient norm "
                f"({record.metrics['grad_norm']}) at step {record.step}; {hint(record)}"
            )
    return losses, skipped


class Progress:
    """Log lines of a loop with its rate and the time left, measured from the step it started
    (or resumed) at."""

    def __init__(self, start_step: int, total_steps: int, items_per_step: int, unit: str):
        self.start_step, self.total_steps = start_step, total_steps
        self.items_per_step, self.unit = items_per_step, unit
        self.started = time.time()

    def log(self, step: int, values: str, *args: Any) -> None:
        """ "step S/T <values % args> | rate, items per second, ETA"."""
        rate = (step - self.start_step) / max(time.time() - self.started, 1e-9)
        logging.info(
            f"step %d/%d {values} | %.2f steps/s %.1f {self.unit}/s ETA %.0fs",
            step,
            self.total_steps,
            *args,
            rate,
            rate * self.items_per_step,
            (self.total_steps - step) / rate,
        )


@contextlib.contextmanager
def closing(checkpoints: Any, data_iterator: Any, timer: LoopTimer | None = None):
    """Closes a loop's checkpoints and data iterator on leaving, also on errors, once the writes
    in flight have completed (so that the last good checkpoint is on disk)."""
    try:
        yield
    finally:
        started = time.time()
        checkpoints.wait()
        if timer is not None:
            timer.final_wait_seconds = time.time() - started
        checkpoints.close()
        data_iterator.close()


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
