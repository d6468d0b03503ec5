"""Importing the training library and the two training commands defines no absl flag: the
commands define theirs when they run, so that a process (a test, a launch script, the planner)
imports any of them beside any other."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# caer_jax.cli's --compilation_cache is left out here: the shared command helper is not one of
# the modules under test, and is imported first so that its flag is in the baseline.
_PROBE = """
import json
from absl import flags
import caer_jax.cli
before = set(flags.FLAGS)
import caer_jax.trainer, caer_jax.pretrain, caer_jax.train
defined = {name: flags.FLAGS.find_module_defining_flag(name) for name in set(flags.FLAGS) - before}
# The libraries (grain, orbax, tfds) define theirs at import; the project's modules must not.
print(json.dumps({k: v for k, v in defined.items() if v.startswith(("caer_jax", "tfds_raer"))}))
"""


def test_importing_the_training_modules_defines_no_flag():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{}", proc.stdout
