"""Starting jax's backends: the environment libtpu reads when it loads, and its start-up noise.

With the `tpu` extra installed (libtpu, for caer_jax.plan) on a machine without a TPU, loading
libtpu prints five lines to the process's stderr from C++ (it asks for the TPU's accelerator
type and worker hostnames, finds neither, and says so). They are harmless here, and they are
not Python warnings, so `quiet_libtpu` captures file descriptor 2 around the load, gives back
every other line, and replaces those with one line saying what they were.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# libtpu's start-up lines on a machine without a TPU (and their source-location trace).
_LIBTPU_NOISE = re.compile(
    r"Failed to find host bounds|could not determine TPU|Logging before InitGoogle|"
    r"unexpected worker hostname|=== Source Location Trace|^learning/|^\s*$"
)
NOISE_NOTE = (
    "libtpu: no TPU attached (its start-up warnings about the accelerator type and worker "
    "hostnames are harmless here and were hidden)"
)


@contextlib.contextmanager
def quiet_libtpu() -> Iterator[None]:
    """Runs the body with stderr (the file descriptor, which C++ writes to) captured; then
    writes back what it printed but libtpu's start-up noise, and NOISE_NOTE once if there was
    any."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if not _LIBTPU_NOISE.search(line)]
            if len(kept) < len([line for line in lines if line.strip()]):
                kept.append(NOISE_NOTE)
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def initialize() -> None:
    """Starts jax's backends (loading libtpu where it is installed) with its noise quieted."""
    import jax

    with quiet_libtpu():
        jax.devices()


def prepare_compile_only() -> None:
    """The environment of a process that compiles for TPUs it does not run on (caer_jax.plan);
    to be called before jax loads libtpu.

    No query of the Cloud metadata server (169.254.169.254) for the host's TPU type (jax sets
    this only where it finds no TPU chip; a TPU VM that plans must not ask either), and the CPU
    as jax's default backend for the little it computes (keys), so that no TPU runtime starts.
    libtpu also takes /tmp/libtpu_lockfile, which guards a TPU against two processes; compiling
    touches no TPU, so plans may run side by side (and beside a training on this host's TPU).
    """
    os.environ["TPU_SKIP_MDS_QUERY"] = "1"
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
