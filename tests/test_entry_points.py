"""Every command as users call it: each `python -m` module with a `__main__` block and each
console script of pyproject.toml (run as setuptools' wrapper runs it: its target function with
sys.argv set), in its own process. A mistake gives one `error:` line and exit status 2; --help
gives the command's text and flags and exit status 0.

The console scripts installed in the venv may be another checkout's (an editable install), so
their targets are read from this checkout's pyproject.toml.
"""

import ast
import json
import re
import sys
from pathlib import Path

import pytest
from test_errors import TINY, assert_user_error, python, run

# Every test runs the commands in their own processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def main_modules() -> set[str]:
    """The modules of the packages that run as `python -m MODULE`."""
    found = set()
    for package in ("caer_jax", "tfds_raer"):
        for path in (REPO / package).rglob("*.py"):
            if path.name.endswith("_test.py"):
                continue  # TFDS's builder test, run by pytest
            if re.search(r'^if __name__ == "__main__":', path.read_text(), re.MULTILINE):
                found.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: name -> "module:function"."""
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section.group(1), re.MULTILINE))


def call(command: str, *args: str, home: Path):
    """`command` (a module, or a console script's name) run with `args` as a user runs it."""
    scripts = console_scripts()
    if command not in scripts:
        return python(command, *args, home=home)
    module, function = scripts[command].split(":")
    wrapper = (  # what setuptools writes into the script
        f"import sys; from {module} import {function}; "
        f"sys.argv[0] = {command!r}; sys.exit({function}())"
    )
    return run([sys.executable, "-c", wrapper, *args], home)


def source(module: str) -> ast.Module:
    # Parsed, not imported: the commands define flags of the same names (absl refuses twice).
    return ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())


def docstring(command: str) -> str:
    return ast.get_docstring(source(console_scripts().get(command, command).split(":")[0]))


def workdir(home: Path) -> str:
    return f"--workdir={home / 'run'}"


TYPO = "--config.train.batchsize=3"
DID_YOU_MEAN = ["--config.train.batchsize", "did you mean --config.train.batch_size?"]

# One mistake per command, (arguments, fragments of the error line); a function of the test's
# home folder where the arguments name a file.
MISTAKES = {
    "caer-train": (lambda home: [TINY, workdir(home), TYPO], DID_YOU_MEAN),
    "caer-eval": (lambda home: [TINY, workdir(home)], ["no checkpoints in", "train first"]),
    "caer_jax.train": (lambda home: [TINY], ["--workdir required"]),
    "caer_jax.eval": (lambda home: [TINY, "--config.data.num_segmnets=4"], ["num_segments"]),
    "caer_jax.ablate": (lambda home: [TINY, workdir(home), TYPO], DID_YOU_MEAN),
    "caer_jax.predict": (lambda home: [TINY, "--workdir=w", "--json=maybe"], ["--json"]),
    "caer_jax.convert": (lambda home: [TINY, "--workdir=w"], ["--official required"]),
    "caer_jax.bench": (lambda home: ["--repeats=many"], ["--repeats=many"]),
    "caer_jax.pretrain": (
        lambda home: [f"--config={REPO / 'configs/pretrain_tiny.py'}"],
        ["--workdir required"],
    ),
    "caer_jax.plan": (lambda home: [TINY, "--topology=v9-8"], ["--topology=v9-8: not a topology"]),
    # A folder without the build is named as not built (it once passed as "no damaged records").
    "caer_jax.data.check": (
        lambda home: [TINY, f"--config.data.data_dir={home / 'nothing'}"],
        ["is not built in", "build it first"],
    ),
    "caer_jax.report": (lambda home: ["--bogus"], ["unknown flag --bogus", "usage:"]),
    "caer_jax.data.synthetic": (lambda home: ["--clips=20"], ["required: --out"]),
    "tfds_raer.raer.benchmark": (lambda home: ["--bogus"], ["unrecognized arguments: --bogus"]),
}


def test_every_command_is_tested():
    # A new `python -m` module or console script needs its line in MISTAKES.
    assert set(MISTAKES) == main_modules() | set(console_scripts())
    for command, target in console_scripts().items():  # a function of no arguments
        module, function = target.split(":")
        defined = {
            f.name: f.args.args for f in source(module).body if isinstance(f, ast.FunctionDef)
        }
        assert defined.get(function) == [], command


@pytest.mark.parametrize("command", sorted(MISTAKES))
def test_a_mistake_is_one_error_line(command, tmp_path):
    args, fragments = MISTAKES[command]
    assert_user_error(call(command, *args(tmp_path), home=tmp_path), *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


# The help of every kind of command: the console scripts (cli.main, the module imported), an absl
# command run with -m whose flags are partly another module's, the report and the argparse ones.
HELP = ["caer-train", "caer-eval", "caer_jax.ablate", "caer_jax.report"]
HELP += ["caer_jax.data.synthetic", "tfds_raer.raer.benchmark"]


@pytest.mark.parametrize("command", HELP)
def test_help(command, tmp_path):
    result = call(command, "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert docstring(command).splitlines()[0] in result.stdout, result.stdout[:2000]
    if command in ("caer-train", "caer-eval", "caer_jax.ablate"):  # absl's help lacked these
        for flag in ("--config", "--workdir", "--compilation_cache"):
            assert flag in result.stdout, result.stdout


# Every command, imported together (as a test or a library user does): none defines a flag when
# imported, so none refuses another's --config. The flags of the libraries they import (grain's,
# absl's) are theirs to define.
# Every command, the training library and the shared command helpers, imported in one process.
COMMAND_MODULES = [
    "caer_jax.cli",
    "caer_jax.trainer",
    "caer_jax.train",
    "caer_jax.ablate",
    "caer_jax.bench",
    "caer_jax.convert",
    "caer_jax.data.check",
    "caer_jax.eval",
    "caer_jax.plan",
    "caer_jax.predict",
    "caer_jax.pretrain",
    "caer_jax.report",
]
OUR_PACKAGES = ("caer_jax", "tfds_raer", "configs", "__main__")


def test_importing_every_command_defines_no_flag(tmp_path):
    script = (
        "import importlib, json; from absl import flags\n"
        f"for name in {COMMAND_MODULES!r}: importlib.import_module(name)\n"
        "print(json.dumps({m: [f.name for f in fs] "
        "for m, fs in flags.FLAGS.flags_by_module_dict().items()}))"
    )
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    defined = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(module.startswith("grain") for module in defined), defined  # the check can see
    ours = {m: names for m, names in defined.items() if m.split(".")[0] in OUR_PACKAGES}
    assert ours == {}


def test_the_builder_and_the_tokenizer_import_no_data_code(tmp_path):
    # Imports run one way: the input pipeline and the caption generator (caer_jax.data) build on
    # the builder and the models, not the other way round.
    script = (
        "import sys, tfds_raer.raer.benchmark, tfds_raer.raer.raer_dataset_builder, "
        "caer_jax.models.tokenizer\n"
        "print(sorted(m for m in sys.modules if m.startswith('caer_jax.data')))"
    )
    result = run([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
