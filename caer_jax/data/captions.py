"""Captions of what the synthetic generator drew: image-text pairs for CLIP pretraining.

Each frame of a drawn clip (synthetic.DrawnClip) gets a caption of its face crop and one of its
context frame, in plain words from the vocabulary below: mouth, eyes, eyebrows, gaze, head pose,
hands, objects on the desk, posture, scene, hair and lighting. Every attribute value has several
phrasings, and a caption lists its attributes in a random order, so that the text encoder learns
the attributes rather than one template.

The words describe the drawing, never the class it was drawn for: no class name appears, and no
class text of caer_jax.prompts (tests/test_pretrain.py checks both). Several of the visual words
(a yawn, drooping eyelids, furrowed eyebrows, a phone) are the words the class descriptors use
too, as a web caption of such a photo would use them; that shared vocabulary is what lets the
pretrained CLIP rank the class descriptors zero-shot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from caer_jax.data import synthetic

# Attribute value -> its phrasings. Face and context captions draw from the same tables.
MOUTH = {
    "neutral": (
        "relaxed mouth",
        "lips closed in a straight line",
        "a calm closed mouth",
        "mouth at rest",
    ),
    "smile": (
        "a wide smile",
        "smiling with teeth showing",
        "mouth corners turned up",
        "an upturned mouth",
        "a big grin",
    ),
    "small_open": (
        "slightly open mouth",
        "lips parted a little",
        "a small open mouth",
        "mouth a little open",
    ),
    "yawn": (
        "a big yawn",
        "yawning widely",
        "mouth wide open in a yawn",
        "a wide yawning mouth",
    ),
}
EYES = {
    "open": ("open eyes", "eyes wide awake", "alert open eyes"),
    "droop": (
        "drooping eyelids",
        "heavy half closed eyelids",
        "sleepy drooping eyes",
        "eyelids sagging low",
    ),
    "closed": ("eyes shut for a blink", "closed eyes", "blinking"),
}
BROWS = {
    "neutral": ("level eyebrows", "flat calm brows", "eyebrows at rest"),
    "raised": ("raised eyebrows", "brows lifted high", "arched eyebrows"),
    "furrowed": (
        "furrowed eyebrows",
        "brows drawn together",
        "knitted eyebrows",
        "a frowning brow",
    ),
}
GAZE = {
    "down": (
        "looking down at the desk",
        "eyes on the study material",
        "reading with lowered eyes",
        "gaze lowered to the desk",
    ),
    "ahead": ("looking straight ahead", "eyes toward the front", "gaze fixed ahead"),
    "up_side": (
        "eyes glancing up to one side",
        "a wandering upward gaze",
        "a puzzled look upward",
    ),
    "away": (
        "looking away to the side",
        "gaze averted from the desk",
        "eyes turned sideways",
    ),
}
HEAD = {
    "upright": ("head held upright", "head level", "sitting up straight"),
    "forward": ("head tilted forward", "head sagging down", "head drooping forward"),
    "turned": ("head turned to the side", "face turned away", "head rotated sideways"),
    "nodding": ("head bobbing up and down", "nodding along"),
}
HANDS = {
    "desk": ("hands resting on the desk", "both hands on the table"),
    "chin": ("chin resting on a hand", "a hand under the chin", "palm under the chin"),
    "phone": (
        "holding a glowing phone up",
        "checking a lit phone in one hand",
        "a bright phone raised up",
    ),
}
DESK_PHONE = {
    True: ("a lit phone on the desk", "a glowing phone on the table"),
    False: ("a dark phone on the desk", "a phone lying on the table"),
}
OBJECTS = {
    "book": ("an open book", "a book lying open"),
    "notebook": ("a notebook and a pen", "a lined notebook with a pen"),
    "laptop": ("a laptop", "the back of a laptop"),
}
SCENES = {
    "classroom": ("in a classroom", "in front of a chalkboard"),
    "library": ("in a library", "by shelves of books"),
    "laboratory": ("in a laboratory", "in a lab with flasks"),
    "dormitory": ("in a dorm room", "in a bedroom"),
}
LIGHT = {
    "bright": ("bright lighting", "a brightly lit shot"),
    "dim": ("dim lighting", "a dark shot"),
}
HAIR_COLOURS = ("black", "dark brown", "light brown", "blond", "red", "grey")
SUBJECTS = ("a student", "a person", "someone", "a learner")
FACE_SUBJECTS = ("a face", "the face of a student", "a head")


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _hair(ident: dict[str, Any]) -> str:
    """The name of the hair colour the identity was jittered from."""
    hair = np.asarray(ident["hair"], float)
    nearest = int(np.argmin([np.sum((hair - np.asarray(c)) ** 2) for c in synthetic._HAIR]))
    length = "long" if ident["long_hair"] else "short"
    return f"{length} {HAIR_COLOURS[nearest]} hair"


def _gaze(plan: dict[str, Any], t: int) -> str:
    gx, gy = plan["gaze"][t]
    if abs(gx) >= 0.9:
        return "away"
    if gy >= 0.4:
        return "down"
    if gy <= -0.4:
        return "up_side"
    return "ahead"


def _head(plan: dict[str, Any], t: int) -> str:
    if plan["tilt"][t] > 0:
        return "forward"
    if plan["turn"][t] != 0:
        return "turned"
    if plan["nod"]:
        return "nodding"
    return "upright"


def _face_parts(rng: np.random.Generator, drawn: synthetic.DrawnClip, t: int) -> list[str]:
    plan = drawn.plan
    return [
        _pick(rng, MOUTH[plan["mouth"][t]]),
        _pick(rng, EYES[plan["eye"][t]]),
        _pick(rng, BROWS[plan["brow"][t]]),
        _pick(rng, GAZE[_gaze(plan, t)]),
        _pick(rng, HEAD[_head(plan, t)]),
    ]


def _join(rng: np.random.Generator, subject: str, parts: list[str]) -> str:
    parts = [parts[i] for i in rng.permutation(len(parts))]
    if rng.random() < 0.5:
        return f"{subject} with " + ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def face_caption(rng: np.random.Generator, drawn: synthetic.DrawnClip, t: int) -> str:
    """A caption of frame t's face crop: three to five of mouth, eyes, eyebrows, gaze and head
    pose, a hand at the chin when there is one, sometimes the hair."""
    parts = _face_parts(rng, drawn, t)
    keep = sorted(rng.choice(len(parts), size=int(rng.integers(3, len(parts) + 1)), replace=False))
    parts = [parts[i] for i in keep]
    if drawn.plan["hand_chin"]:
        parts.append(_pick(rng, HANDS["chin"]))
    elif rng.random() < 0.3:
        parts.append(_hair(drawn.ident))
    return _join(rng, _pick(rng, FACE_SUBJECTS), parts)


def context_caption(rng: np.random.Generator, drawn: synthetic.DrawnClip, t: int) -> str:
    """A caption of frame t's context frame: the person at the desk, hands, objects, scene."""
    plan = drawn.plan
    face = _face_parts(rng, drawn, t)
    # The face is small in the context frame: some of its attributes are left out (and the
    # caption stays about as long as a class descriptor).
    keep = sorted(rng.choice(len(face), size=int(rng.integers(1, 3)), replace=False))
    parts = [face[i] for i in keep]
    hands = "phone" if plan["phone"] == "hand" else "chin" if plan["hand_chin"] else "desk"
    parts.append(_pick(rng, HANDS[hands]))
    parts.append(_pick(rng, OBJECTS[drawn.desk_object]))
    if plan["phone"] == "desk":
        parts.append(_pick(rng, DESK_PHONE[bool(drawn.desk_phone_lit)]))
    gain = drawn.gains[t]
    if abs(gain) > 6:
        parts.append(_pick(rng, LIGHT["bright" if gain > 0 else "dim"]))
    subject = _pick(rng, SUBJECTS)
    if rng.random() < 0.5:
        subject += " " + _pick(rng, SCENES[drawn.scene])
    return _join(rng, subject, parts)


def vocabulary_texts() -> list[str]:
    """Every phrasing of every attribute (the tokenizer learns its words from these)."""
    tables = (MOUTH, EYES, BROWS, GAZE, HEAD, HANDS, DESK_PHONE, OBJECTS, SCENES, LIGHT)
    texts = [p for table in tables for options in table.values() for p in options]
    texts += [f"{length} {c} hair" for c in HAIR_COLOURS for length in ("long", "short")]
    texts += list(SUBJECTS + FACE_SUBJECTS) + ["a student at a desk with a face and"]
    return texts
