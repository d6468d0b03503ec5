"""Small training runs for tests: the embedded default's `scratch` variant (a randomly initialised
CLIP, so that no pretrained folder is needed) shrunk to a few synthetic clips.

A run is described once as config overrides ("data.synthetic.num_clips": 40, ...), which give the
in-process ConfigDict (`config`) and the same settings as command-line flags (`flags`) for runs
in subprocesses. `read_predictions` and `probabilities` read a run's predictions.csv.
"""

import csv
from pathlib import Path

import ml_collections
import numpy as np

from configs import synthetic_tiny

# The smallest model that still has every part (both streams, a temporal net per stream, the
# prompts through a text encoder): 4 frames and one layer per CLIP tower. Every training run of
# the suite uses it, so that their programs compile quickly and once: the session's persistent
# compilation cache (tests/conftest.py) serves each later run of the same program.
GEOMETRY = {"data.num_segments": 4, "model.clip.vision_layers": 1, "model.clip.text_layers": 1}


def overrides(root: Path, num_clips: int = 40, **extra) -> dict:
    """Data under `root`, `num_clips` synthetic clips, the small GEOMETRY, 2 epochs with the LR
    step after the first; `extra` adds or replaces fields (dotted names)."""
    return {
        "data.data_dir": str(root / "tfds"),
        "data.synthetic.manual_dir": str(root / "raer"),
        "data.synthetic.num_clips": num_clips,
        **GEOMETRY,
        "train.num_epochs": 2,
        "train.log_every_steps": 1,
        "optim.milestones": (1,),
        **extra,
    }


def config(settings: dict, variant: str = "") -> ml_collections.ConfigDict:
    """The `scratch` variant of the embedded default (no pretrained folder needed), with
    `variant` (e.g. "face") and `settings` applied."""
    c = synthetic_tiny.get_config(f"scratch,{variant}")
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


def flags(settings: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in settings.items()]


def read_predictions(path: Path) -> dict:
    """predictions.csv: its rows by video_id."""
    with open(path) as f:
        return {row["video_id"]: row for row in csv.DictReader(f)}


def probabilities(predictions: dict) -> np.ndarray:
    """[clips, classes] class probabilities of `read_predictions`' rows, sorted by video_id."""
    return np.array(
        [
            [float(v) for k, v in row.items() if k.startswith("p_")]
            for _, row in sorted(predictions.items())
        ]
    )
