"""Every config file loads, its variants work, and unknown keys are errors."""

import importlib
import re
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
