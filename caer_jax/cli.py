"""Log hygiene for the command-line entry points."""

from __future__ import annotations

import logging as py_logging

from absl import logging

# Libraries whose INFO lines (orbax logs every handler registration) drown the training log.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/grain/")


class _LibraryInfoFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def quiet_library_logs() -> None:
    """Keeps warnings and errors of chatty libraries, drops their INFO lines."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
