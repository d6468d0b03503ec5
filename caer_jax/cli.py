"""What every command-line entry point does first: argument checks, log hygiene, the persistent
compilation cache, and joining a multi-process job."""

from __future__ import annotations

import logging as py_logging

from absl import app, flags, logging

from caer_jax import compilation, distributed

# Libraries whose INFO lines (orbax logs every handler registration) drown the training log.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/grain/")

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    compilation.DEFAULT_CACHE_DIR,
    "Directory of JAX's persistent compilation cache (compiled programs reused by the next run, "
    "resume or eval of the same config); empty: off.",
)


class _LibraryInfoFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def quiet_library_logs() -> None:
    """Keeps warnings and errors of chatty libraries, drops their INFO lines."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def start(argv, **required_flags) -> None:
    """Refuses stray arguments and missing required flags (given as name=value), quiets library
    logs and initialises jax.distributed when the environment describes several processes."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [f"--{name}" for name, value in required_flags.items() if value is None]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} required")
    quiet_library_logs()
    distributed.initialize()
    compilation.enable_persistent_cache(_COMPILATION_CACHE.value)
