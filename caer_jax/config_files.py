"""Config files loaded by path, from any working directory.

A config file is loaded by its path (`--config=/abs/path/configs/synthetic_tiny.py`), from any
working directory and by an installed console script, so `configs/` is not a package that it, or
the library, can import from. A config loads the configs it builds on from its own folder:

    clip_caer_b32 = config_files.sibling(__file__, "clip_caer_b32")

and the benchmarks and the conversion take the paper's setting from this checkout's configs/:
`config_files.load("clip_caer_b32")`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types
from pathlib import Path

from caer_jax import errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load(name: str, folder: str | os.PathLike = CONFIG_DIR) -> types.ModuleType:
    """The config module `name` (the file `name.py` of `folder`), loaded once per process."""
    return _load(str(Path(folder).resolve() / f"{name}.py"))


def sibling(config_file: str, name: str) -> types.ModuleType:
    """The config module `name` beside `config_file` (a config's __file__)."""
    return load(name, Path(config_file).parent)


@functools.cache
def _load(path: str) -> types.ModuleType:
    if not Path(path).is_file():
        raise errors.MissingInputError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(f"caer_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
