"""Every config file loads, its variants work, and unknown keys are errors."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from caer_jax import config_check, errors

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Training configs; pretraining configs (pretrain_*.py) have their own tests (test_pretrain.py).
CONFIGS = sorted(
    p.stem
    for p in CONFIG_DIR.glob("*.py")
    if p.stem != "__init__" and not p.stem.startswith("pretrain_")
)


VARIANTS = ["", "face", "context", "validation", "feature_cache", "face,feature_cache"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_loads_and_every_value_is_in_range(name, variant):
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    assert config.model.streams in ("face", "context", "both")
    config_check.check(config)  # what every command checks first


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.batch_size", 0, "config.train.batch_size=0 (expected >= 1)"),
        ("data.flip_prob", 1.5, "config.data.flip_prob=1.5 (expected in [0, 1])"),
        ("optim.lr.temporal", -0.01, "config.optim.lr.temporal=-0.01 (expected >= 0)"),
        ("optim.milestones", (3, -1), "config.optim.milestones[1]=-1 (expected >= 0)"),
        ("eval.confidence", 1.0, "config.eval.confidence=1.0 (expected in (0, 1))"),
        (
            "train.grad_accum_steps",
            3,
            "grad_accum_steps=3 does not divide config.train.batch_size=8",
        ),
    ],
)
def test_values_out_of_range_are_named(field, value, message):
    from configs import clip_caer_b32

    config = clip_caer_b32.get_config()
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(errors.BadInputError, match=re.escape(message)):
        config_check.check(config)


def test_every_value_out_of_range_is_named_at_once():
    from configs import clip_caer_b32

    config = clip_caer_b32.get_config()
    config.data.num_segments = 0
    config.model.temporal.dropout = 1.0
    with pytest.raises(errors.BadInputError) as raised:
        config_check.check(config)
    assert str(raised.value) == (
        "config.data.num_segments=0 (expected >= 1); "
        "config.model.temporal.dropout=1.0 (expected in [0, 1))"
    )


def test_paper_setting():
    from configs import clip_caer_b32

    c = clip_caer_b32.get_config()
    assert (c.data.num_segments, c.data.image_size, c.train.batch_size, c.train.num_epochs) == (
        16,
        224,
        8,
        20,
    )
    assert dict(c.optim.lr) == {
        "image_encoder": 1e-5,
        "temporal": 1e-2,
        "prompt_learner": 1e-3,
        "project_fc": 1e-5,
    }
    assert (c.optim.momentum, c.optim.weight_decay, tuple(c.optim.milestones)) == (
        0.9,
        1e-4,
        (10, 15),
    )
    assert clip_caer_b32.get_config("face").model.streams == "face"
    with pytest.raises(ValueError, match="unknown variant 'bogus'"):
        clip_caer_b32.get_config("bogus")


def test_embedded_default_is_the_papers_recipe_on_the_pretrained_folder():
    """configs/synthetic_tiny.py departs from the paper's optimizer, pixels and init only in
    `:scratch`; the default differs in epochs alone, milestones scaled with them."""
    from configs import clip_caer_b32, synthetic_tiny

    paper, tiny = clip_caer_b32.get_config(), synthetic_tiny.get_config()
    assert tiny.model.clip.source == synthetic_tiny.PRETRAINED
    for field in ("name", "momentum", "weight_decay", "gamma", "warmup_epochs"):
        assert tiny.optim[field] == paper.optim[field], field
    assert dict(tiny.optim.lr) == dict(paper.optim.lr)
    scale = tiny.train.num_epochs / paper.train.num_epochs
    assert tuple(tiny.optim.milestones) == tuple(round(m * scale) for m in paper.optim.milestones)
    assert tiny.model.pixel_normalization == paper.model.pixel_normalization == "none"
    assert tiny.model.temporal.init_std == paper.model.temporal.init_std == 1.0
    scratch = synthetic_tiny.get_config("scratch,face")
    assert (scratch.model.clip.source, scratch.optim.name) == ("random", "adamw")
    assert scratch.model.streams == "face"


def test_locked_config_refuses_new_fields():
    from configs import synthetic_tiny

    c = synthetic_tiny.get_config("scratch")
    c.lock()
    with pytest.raises(AttributeError, match="datset"):
        c.datset = 1


# Every config file and every variant its get_config takes.
EVERY_VARIANT = {
    "clip_caer_b16": VARIANTS,
    "clip_caer_b32": VARIANTS,
    "clip_caer_l14": VARIANTS,
    "synthetic_tiny": [*VARIANTS, "scratch", "face,scratch", "feature_cache,scratch"],
    "pretrain_tiny": [""],  # its get_config takes no argument
}


def _elsewhere(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` run in an empty working directory with this checkout's packages importable and not
    its root, as an installed console script runs: `configs` is then no package to import."""
    packages = tmp_path / "packages"
    packages.mkdir()
    for package in ("caer_jax", "tfds_raer"):
        (packages / package).symlink_to(CONFIG_DIR.parent / package)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(packages)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_config_file_loads_by_its_path_from_another_directory(tmp_path):
    assert set(EVERY_VARIANT) == {p.stem for p in CONFIG_DIR.glob("*.py")} - {"__init__"}
    given = [
        f"{CONFIG_DIR / name}.py" + (f":{variant}" if variant else "")
        for name, variants in EVERY_VARIANT.items()
        for variant in variants
    ]
    # Through absl and ml_collections, as a command's --config loads it.
    script = f"""
import json
from absl import flags
from ml_collections import config_flags
loaded = {{}}
for value in {given!r}:
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["command", "--config=" + value])
    loaded[value] = values.config.to_dict()
print(json.dumps({{value: sorted(config) for value, config in loaded.items()}}))
"""
    result = _elsewhere(tmp_path, [sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(loaded) == sorted(given)
    assert all({"data", "model", "train"} <= set(fields) for fields in loaded.values())


def test_a_command_from_another_directory_names_the_folder_it_looked_in(tmp_path):
    # The config loads by its absolute path; its data_dir (data/tfds) is relative to the working
    # directory, and the error says which directory that was.
    config = f"--config={CONFIG_DIR / 'synthetic_tiny.py'}:scratch"
    result = _elsewhere(tmp_path, [sys.executable, "-m", "caer_jax.data.check", config])
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"is not built in 'data/tfds' (relative to {tmp_path / 'elsewhere'})" in error, error
