"""Batches on the device ahead of the step that uses them.

`DevicePrefetch` wraps a host iterator (grain's, or any iterator of dicts of numpy arrays) and
keeps `size` global batches already transferred onto the mesh's batch sharding. JAX dispatches
transfers and steps asynchronously, so while the device runs step k the host fetches batch
k + size and starts its copy: host and device work at the same time instead of taking turns.

A checkpoint must record the position of the batches the loop has *used*, not of those waiting
in the buffer: `get_state()` returns the host iterator's state as it was right after the last
batch handed out, and `set_state()` empties the buffer before moving the host iterator. The
wrapper is what the loop gives grain's orbax handler (it is a `grain.DatasetIterator`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

from caer_jax.data import pipeline


class DevicePrefetch(grain.DatasetIterator):
    """Yields (device batch, host fields) with `size` device batches in flight.

    `host_fields` are keys whose host arrays are also returned (e.g. the clip indices that an
    error message names), so the loop never reads them back from the device.
    """

    def __init__(
        self,
        host_iterator: Iterator[dict],
        mesh: jax.sharding.Mesh,
        *,
        size: int = 2,
        host_fields: Sequence[str] = ("index",),
    ):
        if size < 1:
            raise ValueError(f"device prefetch needs size >= 1, got {size}")
        super().__init__()
        self._host = host_iterator
        self._mesh = mesh
        self._size = size
        self._host_fields = tuple(host_fields)
        self._buffer: collections.deque = collections.deque()
        # State of the host iterator before any batch was taken from it.
        self._state = self._host_state()

    def _host_state(self) -> Any:
        get_state = getattr(self._host, "get_state", None)
        return get_state() if get_state else None

    def _fill(self) -> None:
        while len(self._buffer) < self._size:
            try:
                host_batch = next(self._host)
            except StopIteration:
                return
            extras = {k: np.array(host_batch[k]) for k in self._host_fields if k in host_batch}
            device_batch = pipeline.global_batch(host_batch, self._mesh)
            # Where the host iterator stands once this batch is used: what a checkpoint saves.
            self._buffer.append((device_batch, extras, self._host_state()))

    def __next__(self) -> tuple[dict, dict]:
        self._fill()
        if not self._buffer:
            raise StopIteration
        device_batch, extras, self._state = self._buffer.popleft()
        self._fill()  # the next transfers start before the caller dispatches its step
        return device_batch, extras

    def peek(self) -> dict | None:
        """The device batch that the next __next__ returns, left in place; None at the end."""
        self._fill()
        return self._buffer[0][0] if self._buffer else None

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        self._buffer.clear()
        self._host.set_state(state)
        self._state = state

    def close(self) -> None:
        self._buffer.clear()
        close = getattr(self._host, "close", None)
        if close:
            close()
