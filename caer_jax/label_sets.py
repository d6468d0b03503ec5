"""Label sets: the classes a dataset is annotated with, and the class texts of the prompts.

RAER was annotated with two label sets of different granularity; the authors' code publishes only
the five-class one, built in here as "raer5" (caer_jax.prompts holds its texts). Any other set is a
small JSON file:

  {"name": "coarse4",
   "class_names": ["Engaged", "Confused", "Tired", "Distracted"],
   "texts": {"class_descriptor": ["...", "...", "...", "..."],
             "class_names": ["Engaged.", "Confused.", "Tired.", "Distracted."]}}

Annotation files number the classes 1..n in the order of `class_names`. `texts` maps each text
type the set supports (config.model.prompt.text_type) to one text per class, in that order. One
set drives the builder (the valid label range, the ClassLabel names of the dataset), the model
(one prompt per class) and the metrics (class names in metrics.json, the confusion matrix and
predictions.csv). A checkpoint records its class names, and evaluation refuses a dataset whose
classes differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caer_jax import errors, prompts


class LabelSetError(errors.BadInputError):
    """A label set file is malformed, or two label sets that must agree differ."""


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Class names (label ids 0..n-1) and, per text type, one prompt text per class."""

    name: str
    class_names: tuple[str, ...]
    texts: Mapping[str, tuple[str, ...]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_texts(self, text_type: str) -> tuple[str, ...]:
        """The class texts of `text_type`, in label order."""
        if text_type not in self.texts:
            raise LabelSetError(
                f"config.model.prompt.text_type={text_type!r}: label set {self.name!r} has no "
                f"texts of that type; it has {sorted(self.texts)}"
            )
        return self.texts[text_type]


RAER5 = LabelSet("raer5", prompts.CLASS_NAMES, prompts.TEXT_TYPES)
BUILTIN = {RAER5.name: RAER5}


def load(spec: str) -> LabelSet:
    """A built-in set by name ("raer5"), or the set of a JSON file (a path ending in .json)."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if not spec.endswith(".json"):
        raise LabelSetError(
            f"label set {spec!r}: neither a built-in set ({sorted(BUILTIN)}) nor a .json file"
        )
    path = Path(spec)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabelSetError(f"label set file {path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelSetError(f"label set file {path}: not valid JSON: {e}") from None
    return from_dict(data, str(path))


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LabelSetError(f"{where}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def from_dict(data: Any, where: str) -> LabelSet:
    """The set described by `data` (the JSON object above); errors name `where` and the key."""
    if not isinstance(data, dict):
        raise LabelSetError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "class_names", "texts"})
    missing = sorted({"name", "class_names", "texts"} - set(data))
    if unknown or missing:
        raise LabelSetError(
            f"{where}: keys must be name, class_names and texts (missing {missing}, "
            f"unknown {unknown})"
        )
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise LabelSetError(f"{where}: name must be a non-empty string, got {name!r}")
    class_names = _strings(data["class_names"], f"{where}: class_names")
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise LabelSetError(
            f"{where}: class_names needs at least two distinct names, got {list(class_names)}"
        )
    texts = data["texts"]
    if not isinstance(texts, dict) or not texts:
        raise LabelSetError(f"{where}: texts must map text types to lists of class texts")
    parsed = {}
    for text_type, values in texts.items():
        parsed[text_type] = _strings(values, f"{where}: texts[{text_type!r}]")
        if len(parsed[text_type]) != len(class_names):
            raise LabelSetError(
                f"{where}: texts[{text_type!r}] has {len(parsed[text_type])} texts for "
                f"{len(class_names)} classes"
            )
    return LabelSet(name, class_names, parsed)


def check_same_classes(
    ours: Sequence[str], ours_what: str, theirs: Sequence[str], theirs_what: str
) -> None:
    """Raises LabelSetError naming both sides when two lists of class names differ."""
    if list(ours) != list(theirs):
        raise LabelSetError(
            f"{ours_what} has the classes {list(ours)}, but {theirs_what} has {list(theirs)}"
        )
