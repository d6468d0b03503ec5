"""Compilation paid once: JAX's persistent compilation cache, and a count of what was compiled.

Every entry point (train, eval, predict, convert, bench) turns the cache on through
`caer_jax.cli.start` (flag `--compilation_cache=DIR`, default `cli.DEFAULT_COMPILATION_CACHE`; an
empty value turns it off). A resume, an evaluation or a second run of the same config then loads its
programs (on GPUs with their autotuning results) instead of compiling them again. Programs are
keyed by JAX on the computation, the devices and the compiler options, so a changed config or
JAX version compiles afresh.

`stats()` reports how many programs this process needed, how long compiling or loading them took
and how many came from the persistent cache; the training loop writes them into speed.json.
"""

from __future__ import annotations

import collections
from pathlib import Path

import jax

_COUNTS: collections.Counter = collections.Counter()
_SECONDS: collections.Counter = collections.Counter()
_EVENTS = {
    "/jax/compilation_cache/cache_hits": "persistent_cache_hits",
    "/jax/compilation_cache/cache_misses": "persistent_cache_misses",
}
_DURATIONS = {
    # Wraps compiling *or* loading from the persistent cache.
    "/jax/core/compile/backend_compile_duration": "programs",
    "/jax/core/compile/jaxpr_trace_duration": "traces",
}
_listening = False


def _on_event(event: str, **kwargs) -> None:
    if event in _EVENTS:
        _COUNTS[_EVENTS[event]] += 1


def _on_duration(event: str, seconds: float, **kwargs) -> None:
    if event in _DURATIONS:
        _COUNTS[_DURATIONS[event]] += 1
        _SECONDS[_DURATIONS[event]] += seconds


def listen() -> None:
    """Starts counting compilations (idempotent)."""
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True


def enable_persistent_cache(directory: str) -> None:
    """Caches every compiled program of this process in `directory` ("" leaves it off)."""
    listen()
    if not directory:
        return
    Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    # JAX's default skips programs that compile in under a second; on a CPU many of ours do,
    # and a resume would compile them again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def disable_persistent_cache() -> None:
    """No persistent cache in this process, even where JAX_COMPILATION_CACHE_DIR names one (that
    variable alone turns jax's cache on)."""
    jax.config.update("jax_enable_compilation_cache", False)


def stats() -> dict:
    """Programs compiled or loaded from the persistent cache (and the seconds that took),
    traces, persistent-cache hits and misses."""
    return {
        "programs": _COUNTS["programs"],
        "compile_or_load_seconds": round(_SECONDS["programs"], 3),
        "traces": _COUNTS["traces"],
        "persistent_cache_hits": _COUNTS["persistent_cache_hits"],
        "persistent_cache_misses": _COUNTS["persistent_cache_misses"],
        "cache_dir": jax.config.jax_compilation_cache_dir or "",
    }
