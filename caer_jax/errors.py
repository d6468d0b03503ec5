"""User mistakes, and how every command line reports them: one `error:` line, exit status 2.

A mistake in what the user gave (a missing or unreadable file, a truncated checkpoint, a config
field or flag with a wrong name or value, an empty workdir) raises a `UserError` where it is
detected, with a message that names the file, field or flag and says what to do; so does a data
file that storage damaged (DamagedDataError, which names the record too). The entry points
turn it into one line on stderr and exit status 2; any other exception is a bug and keeps its
traceback. The subclasses also derive from the built-in type that callers already catch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

from absl import app

EXIT_STATUS = 2  # as argparse and most Unix tools use for a usage error


def named_path(path: str | os.PathLike) -> str:
    """`path` quoted, with the folder a relative path was looked up in: configs name their files
    relative to the working directory, and a command run elsewhere misses them."""
    text = os.fspath(path)
    return repr(text) if os.path.isabs(text) else f"{text!r} (relative to {os.getcwd()})"


class UserError(Exception):
    """A mistake in the input of a command; the message says which input and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, folder or checkpoint the command needs is not there."""


class BadInputError(UserError, ValueError):
    """A file, flag or config value is there but unusable (wrong name, value or contents)."""


class DamagedDataError(BadInputError):
    """A dataset or feature-cache file, written whole, is missing or damaged now (flipped bytes,
    cut short, deleted). `what` names the file, the record and its clip; `remedy` says how to get
    the file back. Both are its args, so that it crosses grain's worker processes (pickled)
    whole."""

    def __init__(self, what: str, remedy: str):
        super().__init__(what, remedy)

    @property
    def what(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return f"{self.args[0]}; {self.args[1]}"


def one_line(message: object) -> str:
    """The message on one line (line breaks become "; ")."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object) -> NoReturn:
    """Prints `error: message` to stderr and exits with status 2."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands that are not absl programs: a mistake raises BadInputError
    (under `reported()`, one `error:` line and exit status 2) instead of printing the usage and
    argparse's own line. --help shows the description (the command's docstring) as written."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise BadInputError(f"{message} (--help lists the arguments)")


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Runs the body; a UserError that escapes it becomes the `error:` line and exit status 2."""
    try:
        yield
    except UserError as e:
        # The failed call's frames may hold batches in a grain worker's shared memory, which is
        # released when its arrays are freed: freed now, before the exit, not left to the
        # interpreter's shutdown (multiprocessing would warn of "leaked shared_memory").
        _clear_frames(e)
        gc.collect()
        fail(e)


def _clear_frames(error: BaseException | None) -> None:
    """Drops the local variables of the frames of `error` and of the errors it was raised from,
    and of the frames that called them (grain rebuilds a worker's traceback over its reader
    thread's frames); frames still running (reported()'s callers) keep theirs."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            while frame is not None and id(frame) not in seen:
                seen.add(id(frame))
                try:
                    frame.clear()
                except RuntimeError:  # still running
                    pass
                frame = frame.f_back
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


class ExitOnUserError(app.ExceptionHandler):
    """An absl exception handler (`app.install_exception_handler`) for absl programs that are not
    ours, i.e. `tfds build`: a UserError becomes the `error:` line and exit status 2.

    absl calls handlers after main() has unwound (every `finally` has run) and swallows a
    SystemExit raised inside one, so the process ends with os._exit after flushing its output.
    """

    def wants(self, exc: BaseException) -> bool:
        return isinstance(exc, UserError)

    def handle(self, exc: BaseException) -> None:
        sys.stdout.flush()
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_STATUS)
