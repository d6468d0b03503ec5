"""What every command-line entry point does: flags parsed with the error style of
`caer_jax.errors` (one `error:` line, exit status 2, for any mistake of the user's), argument
checks, log hygiene, the persistent compilation cache, and joining a multi-process job.

A command defines its flags when it runs, not when it is imported (a library module, or a test,
imports several commands in one process, and absl refuses a flag defined twice):

    def define_flags() -> dict[str, flags.FlagHolder]:
        return {"config": cli.define_config_flag(), "workdir": flags.DEFINE_string(...)}
    def run(argv, flag: cli.Flags): cli.start(argv, config=flag.config.value, ...); ...
    def main(): cli.main(run, define_flags)
"""

from __future__ import annotations

import difflib
import logging as py_logging
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag

# Only light modules here: jax and the library load when a command starts its work (`start`),
# so that --help, a flag mistake or a bad config value answers in a fraction of a second.
from caer_jax import backend, config_check, errors

# Libraries whose INFO lines (orbax logs every handler registration, httpx every request to the
# Hugging Face hub) drown the training log.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/httpx")

_COMPILATION_CACHE = "compilation_cache"
DEFAULT_COMPILATION_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caer_jax" / "jax"
)

# The flags that this module's helpers define belong to the command that calls them (its --help
# lists them as its own).
flags.disclaim_key_flags()

# A command's flags by name (`flag.config.value`), as its define_flags returned them.
Flags = types.SimpleNamespace


def define_config_flag(name: str = "config", help_string: str = "Config file.") -> flags.FlagHolder:
    """A --config flag: an ml_collections config file (`path[:variant]`), locked against new
    fields, its values settable as --config.a.b=VALUE."""
    return config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)


def define_common_flags() -> None:
    """The flags of every command: --compilation_cache."""
    flags.DEFINE_string(
        _COMPILATION_CACHE,
        DEFAULT_COMPILATION_CACHE,
        "Directory of JAX's persistent compilation cache (compiled programs reused by the next "
        "run, resume or eval of the same config); empty: off.",
    )


class _LibraryInfoFilter(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def quiet_library_logs() -> None:
    """Keeps warnings and errors of chatty libraries, drops their INFO lines."""
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def start(argv, *, persistent_cache: bool = True, **required_flags) -> None:
    """Refuses stray arguments, missing required flags (given as name=value), config values out
    of range (config_check) and a --workdir that is a file; quiets library logs, initialises
    jax.distributed when the environment describes several processes, and turns the persistent
    compilation cache on (--compilation_cache), or with `persistent_cache=False` off, whatever
    the flag or the environment says."""
    if len(argv) > 1:
        raise errors.BadInputError(f"unexpected arguments: {' '.join(argv[1:])} (flags need --)")
    missing = [f"--{name}" for name, value in required_flags.items() if value is None]
    if missing:
        raise errors.BadInputError(f"{' and '.join(missing)} required")
    for value in required_flags.values():
        if isinstance(value, ml_collections.ConfigDict):
            config_check.check(value)
    workdir = required_flags.get("workdir")
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.BadInputError(f"--workdir={workdir}: is a file; give a folder")
    from caer_jax import compilation, distributed  # jax loads here (see the imports above)

    quiet_library_logs()
    distributed.initialize()
    backend.initialize()
    if persistent_cache:
        compilation.enable_persistent_cache(flags.FLAGS[_COMPILATION_CACHE].value)
    else:
        compilation.disable_persistent_cache()


def main(
    run: Callable[[list[str], Flags], object],
    define_flags: Callable[[], dict[str, flags.FlagHolder]],
) -> None:
    """Defines the common flags and the command's (`define_flags()`, passed to `run(argv, flag)`
    as a Flags), then `app.run(run)` in
    the error style of caer_jax.errors: a flag or config mistake, or a UserError raised by `run`,
    prints one `error:` line and exits with status 2. --help (or -h) prints the command's
    docstring and flags and exits with status 0."""
    define_common_flags()
    command_flags = Flags(**define_flags())

    def guarded(argv: list[str]) -> object:
        with errors.reported():
            return run(argv, command_flags)

    def parse(argv: list[str]) -> list[str]:
        given = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        if set(given) & _HELP_FLAGS:
            print(usage(sys.modules[run.__module__]))
            sys.exit(0)
        return parse_flags(argv)

    app.run(guarded, flags_parser=parse)


# absl's own --help exits with status 1 and shows the docstring and flags of `__main__`, which
# for an installed console script (caer-train) is setuptools' wrapper: no text, no flags.
_HELP_FLAGS = {"--help", "-help", "--helpshort", "-helpshort", "-?", "-h"}


def usage(module) -> str:
    """The help of the command whose `run` is in `module`: its docstring and the flags it
    defines, those of this module's helpers included (absl files the flags of a module run with
    -m under sys.argv[0])."""
    name = sys.argv[0] if module.__name__ == "__main__" else module.__name__
    listed = flags.FLAGS.module_help(name)
    text = (module.__doc__ or "").strip()
    return f"{text}\n\nflags:\n{listed}\n\n--helpfull lists every flag, those of the libraries too."


# ----------------------------------------------------------------------------- flags


def _config_flags() -> list[str]:
    return [name for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])]


def _config_argument(argv: Sequence[str], name: str) -> str | None:
    """The value given to --name (as --name=VALUE or --name VALUE), if any."""
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                return arg[len(prefix) + 1 :]
            if arg == prefix and i + 1 < len(argv):
                return argv[i + 1]
    return None


def _check_config_files(argv: Sequence[str]) -> None:
    # ml_collections defers a missing config file's error to the first use of the config (and
    # raises it from inside a field override), so it is checked here, before parsing.
    for name in _config_flags():
        value = _config_argument(argv, name)
        if value is None:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise errors.MissingInputError(
                f"--{name}={value}: no such config file {path!r} (relative to {os.getcwd()}); "
                f"give a file of configs/, e.g. --{name}=configs/synthetic_tiny.py"
            )
        if not os.access(path, os.R_OK):
            raise errors.BadInputError(f"--{name}={value}: cannot read {path!r} (permissions)")


def _first_unknown(config: ml_collections.ConfigDict, path: str) -> tuple | None:
    """(known leading names, the first unknown name, the fields beside it) of a dotted path."""
    node, seen = config, []
    for part in path.split("."):
        if not (isinstance(node, ml_collections.ConfigDict) and part in node):
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return seen, part, fields
        node, seen = node[part], [*seen, part]
    return None


def _unknown_config_field(argv: Sequence[str]) -> str | None:
    """The message for the first `--config.a.b=...` that names no field of the config, if any."""
    for name in _config_flags():
        value = _config_argument(argv, name)
        if value is None:
            continue
        config = flags.FLAGS[name].parser.parse(value)
        for arg in argv:
            override = re.match(rf"--(?:no)?{name}\.([^=]+)", arg)
            unknown = override and _first_unknown(config, override.group(1))
            if not unknown:
                continue
            seen, part, fields = unknown
            where = ".".join([name, *seen])
            close = difflib.get_close_matches(part, fields, n=1)
            hint = (
                f"did you mean --{where}.{close[0]}?"
                if close
                else f"{where} has the fields {', '.join(sorted(fields)) or 'none'}"
            )
            return f"{arg.split('=', 1)[0]}: {where} has no field {part!r}; {hint}"
    return None


def _config_file_fault(error: BaseException, argv: Sequence[str]) -> str | None:
    """The message for an exception that a config file named in `argv` raised (a syntax error,
    or an error of its get_config that absl does not wrap), naming the file and line; None when
    the exception did not come from such a file."""
    files = {}
    for name in _config_flags():
        value = _config_argument(argv, name)
        if value is not None:
            files[os.path.realpath(value.split(":", 1)[0])] = f"--{name}={value}"
    if isinstance(error, SyntaxError):
        places, what = [(error.filename or "", error.lineno)], error.msg
    else:
        places = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
        what = str(error)
    for filename, line in reversed(places):  # the innermost line of the file is the one to fix
        flag = files.get(os.path.realpath(filename)) if filename else None
        if flag:
            return f"{flag}: {filename} line {line}: {type(error).__name__}: {what}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser) with user mistakes as one `error:` line."""
    with errors.reported():
        _check_config_files(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A bad value, an unknown flag, or a ValueError or TypeError raised inside the config file
        # (whose message ml_collections fills with the traceback: its first and last lines say it).
        lines = [line for line in str(e).splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
        errors.fail(f"{message} (--helpfull lists the flags)")
    except Exception as e:
        fault = _config_file_fault(e, argv)
        if fault:
            errors.fail(fault)
        # ml_collections raises these from inside the parser for an override of an unknown
        # field; anything else is not a mistake of the user's and keeps its traceback.
        unknown = _unknown_config_field(argv) if isinstance(e, (AttributeError, KeyError)) else None
        if unknown is None:
            raise
        errors.fail(unknown)
