"""Every config file loads, its variants work, and unknown keys are errors."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIGS)
def test_loads(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.streams in ("face", "context", "both")
    assert config.train.batch_size > 0


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


def test_unknown_key_on_the_command_line_is_an_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "caer_jax.train",
            f"--config={CONFIG_DIR / 'synthetic_tiny.py'}",
            f"--workdir={tmp_path}",
            "--config.train.batchsize=16",
        ],
        capture_output=True,
        text=True,
        cwd=CONFIG_DIR.parent,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --config.train.batchsize: config.train has no field 'batchsize'; "
        "did you mean --config.train.batch_size?"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_locked_config_refuses_new_fields():
    from configs import synthetic_tiny

    c = synthetic_tiny.get_config()
    c.lock()
    with pytest.raises(AttributeError, match="datset"):
        c.datset = 1
