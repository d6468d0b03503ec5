"""Synthetic clips in the RAER layout: the embedded default's data when RAER is not at hand.

  python -m caer_jax.data.synthetic --out data/synthetic_raer --clips 600 --seed 0

Writes what the RAER release holds (see the TFDS builder in tfds_raer/raer):
  clips/0001/000001.jpg ...   one folder of JPEG frames per clip
  train.txt, test.txt         "<frames_dir> <num_frames> <label 1..5>" (1..k with --classes k),
                              stratified about 4:1
  face_boxes.json             {frames_dir: {frame_file: [left, upper, right, lower]}}, some frames missing
  body_boxes.json             {frames_dir: [left, upper, right, lower]}, some clips missing

Each frame shows a student at a desk in a procedurally drawn scene (classroom, library,
laboratory, dormitory; a nuisance independent of the label). The label rules make both streams
and time matter:
  Neutrality   neutral face looking down at the study material, hands on the desk (a phone may
               lie on the desk as a distractor).
  Enjoyment    wide open smile and raised brows in every frame, sometimes nodding.
  Confusion    furrowed brows and a small open mouth, puzzled gaze, sometimes hand at the chin.
  Fatigue      neutral face except in one contiguous stretch (25-50% of the clip) of drooping
               eyelids, often a big yawn, head tilted forward: single frames often look neutral.
  Distraction  in about 70% of clips the face is drawn exactly like Neutrality and only the
               context differs (a bright phone held up in the hand, outside the face crop); in
               the rest the head is turned and the gaze averted.
Labels of a `label_noise` fraction of clips are replaced by another class drawn uniformly.
With `num_classes` k < 5 only the first k classes (and rules) are drawn, labelled 1..k: data of a
coarser label set (caer_jax.label_sets) for tests.

Deterministic for a seed: every clip draws from its own generator seeded by (seed, clip index),
so the files are byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from caer_jax import errors
from caer_jax.prompts import CLASS_NAMES

NEUTRALITY, ENJOYMENT, CONFUSION, FATIGUE, DISTRACTION = range(5)
# Class shares (label order of CLASS_NAMES): Neutrality most common, Enjoyment/Confusion rarest.
CLASS_PROPORTIONS = (0.40, 0.10, 0.10, 0.18, 0.22)
SCENES = ("classroom", "library", "laboratory", "dormitory")
CLIPS_DIR = "clips"
MIN_CLIPS = 10
FACE_BOX_MISS_RATE = 0.05  # mean share of frames without a face box (detector misses)
BODY_BOX_MISS_RATE = 0.08  # share of clips without a body box
PHONE_IN_HAND_SHARE = 0.7  # share of Distraction clips whose face is drawn like Neutrality

_SKIN = (
    (255, 219, 172),
    (241, 194, 125),
    (224, 172, 105),
    (198, 134, 66),
    (141, 85, 36),
    (92, 58, 30),
)
_HAIR = ((20, 18, 16), (60, 40, 25), (110, 75, 40), (200, 160, 90), (150, 60, 30), (130, 130, 130))


# ----------------------------------------------------------------------------- labels and splits


def _class_counts(num_clips: int, num_classes: int) -> np.ndarray:
    """Largest-remainder allocation of the first num_classes CLASS_PROPORTIONS (renormalised),
    at least one clip per class."""
    shares = np.asarray(CLASS_PROPORTIONS[:num_classes])
    raw = shares / shares.sum() * num_clips
    counts = np.maximum(np.floor(raw).astype(int), 1)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    i = 0
    while counts.sum() < num_clips:
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > num_clips:  # only when the minimum of one pushed it over
        counts[int(np.argmax(counts))] -= 1
    return counts


def _plan(num_clips: int, seed: int, label_noise: float, test_fraction: float, num_classes: int):
    """True labels, split membership (stratified) and written labels of every clip."""
    rng = np.random.default_rng([seed, 0x5EED])
    counts = _class_counts(num_clips, num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts))
    is_test = np.zeros(num_clips, bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n_test = int(round(len(members) * test_fraction))
        n_test = min(n_test, len(members) - 1)  # keep every class in train
        is_test[rng.choice(members, size=n_test, replace=False)] = True
    written = labels.copy()
    num_noisy = int(round(label_noise * num_clips))
    noisy = np.sort(rng.choice(num_clips, size=num_noisy, replace=False))
    for i in noisy:
        other = [c for c in range(num_classes) if c != labels[i]]
        written[i] = other[int(rng.integers(len(other)))]
    return labels, is_test, written, noisy


# ----------------------------------------------------------------------------- drawing


def _jitter_colour(rng: np.random.Generator, colour, amount: int = 20) -> tuple[int, int, int]:
    c = np.asarray(colour) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _random_colour(rng: np.random.Generator, lo: int = 30, hi: int = 230) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _draw_scene(
    rng: np.random.Generator, w: int, h: int, s: float, desk_top: int
) -> tuple[Image.Image, str]:
    """Static background: room of a random kind with furniture, then the desk; and the kind."""
    scene = SCENES[int(rng.integers(len(SCENES)))]
    wall = {
        "classroom": (225, 220, 190),
        "library": (170, 130, 95),
        "laboratory": (215, 225, 230),
        "dormitory": (235, 200, 180),
    }[scene]
    img = Image.new("RGB", (w, h), _jitter_colour(rng, wall, 25))
    d = ImageDraw.Draw(img)
    if scene == "classroom":
        x0 = int(rng.integers(0, max(1, w // 3)))
        d.rectangle((x0, int(6 * s), x0 + int(w * 0.55), int(h * 0.45)), fill=(30, 70, 45))
        for _ in range(int(rng.integers(2, 5))):  # chalk scribbles
            y = int(rng.integers(int(10 * s), int(h * 0.42)))
            x = x0 + int(rng.integers(4, max(5, int(w * 0.45))))
            d.line((x, y, x + int(rng.integers(8, 30) * s), y), fill=(220, 220, 220), width=1)
    elif scene == "library":
        for row in range(3):
            y0 = int(row * h * 0.25)
            d.rectangle((0, y0 + int(h * 0.22), w, y0 + int(h * 0.25)), fill=(90, 60, 35))
            x = 0
            while x < w:
                bw = int(rng.integers(3, 8) * s) + 1
                d.rectangle(
                    (x, y0 + int(h * 0.04), x + bw - 1, y0 + int(h * 0.22)),
                    fill=_random_colour(rng),
                )
                x += bw
    elif scene == "laboratory":
        step = max(4, int(12 * s))
        grid = _jitter_colour(rng, (170, 180, 185), 15)
        for x in range(0, w, step):
            d.line((x, 0, x, h), fill=grid)
        for y in range(0, h, step):
            d.line((0, y, w, y), fill=grid)
        for _ in range(int(rng.integers(2, 5))):  # flasks on a shelf
            x = int(rng.integers(0, w - int(10 * s)))
            d.polygon(
                [
                    (x, int(h * 0.3)),
                    (x + int(10 * s), int(h * 0.3)),
                    (x + int(5 * s), int(h * 0.15)),
                ],
                fill=_random_colour(rng),
            )
    else:  # dormitory
        bx = int(rng.integers(0, w // 2))
        d.rectangle((bx, int(h * 0.45), bx + int(w * 0.5), desk_top), fill=_random_colour(rng))
        px = int(rng.integers(0, w - int(30 * s)))
        d.rectangle(
            (px, int(8 * s), px + int(26 * s), int(8 * s) + int(34 * s)), fill=_random_colour(rng)
        )
    desk = _jitter_colour(
        rng, ((140, 95, 55), (120, 120, 125), (180, 150, 110))[int(rng.integers(3))], 20
    )
    d.rectangle((0, desk_top, w, h), fill=desk)
    d.line(
        (0, desk_top, w, desk_top),
        fill=tuple(max(0, v - 50) for v in desk),
        width=max(1, int(2 * s)),
    )
    return img, scene


def _draw_face(
    d: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    fw: float,
    fh: float,
    ident: dict,
    brow: str,
    eye: str,
    mouth: str,
    gaze: tuple[float, float],
    turn: float,
    s: float,
):
    """Head: hair, face ellipse, brows, eyes, mouth. Returns the face box (float)."""
    face = (cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2)
    hair = ident["hair"]
    d.ellipse((face[0] - 3 * s, face[1] - 5 * s, face[2] + 3 * s, cy + fh * 0.05), fill=hair)
    if ident["long_hair"]:
        d.rectangle((face[0] - 3 * s, cy - fh * 0.1, face[0] + 4 * s, cy + fh * 0.45), fill=hair)
        d.rectangle((face[2] - 4 * s, cy - fh * 0.1, face[2] + 3 * s, cy + fh * 0.45), fill=hair)
    skin = ident["skin"]
    dark_skin = tuple(max(0, v - 45) for v in skin)
    d.ellipse(face, fill=skin, outline=dark_skin)
    d.chord((face[0], face[1] - 1, face[2], cy - fh * 0.05), 180, 360, fill=hair)  # fringe

    lw = max(2, int(round(3 * s)))
    fx = cx + turn * fw * 0.18  # features slide sideways when the head turns
    ex, ey = fw * 0.21, cy + fh * 0.02
    ew, eh = fw * 0.19, fh * 0.11
    by = ey - fh * 0.15
    for side in (-1, 1):
        x = fx + side * ex
        # eyebrows: neutral flat, raised high and arched, furrowed angled down toward the nose
        if brow == "raised":
            y = by - fh * 0.06
            d.line(
                (x - ew * 0.7, y + 2 * s, x, y - 2 * s, x + ew * 0.7, y + 2 * s),
                fill=hair,
                width=lw,
            )
        elif brow == "furrowed":
            inner, outer = x - side * ew * 0.7, x + side * ew * 0.7
            d.line((outer, by - fh * 0.05, inner, by + fh * 0.06), fill=(25, 20, 15), width=lw + 1)
        else:
            d.line((x - ew * 0.7, by, x + ew * 0.7, by), fill=hair, width=lw)
        # eyes
        box = (x - ew / 2, ey - eh / 2, x + ew / 2, ey + eh / 2)
        if eye == "closed":
            d.line((box[0], ey, box[2], ey), fill=(30, 20, 20), width=lw)
            continue
        d.ellipse(box, fill=(250, 250, 250), outline=(40, 30, 30))
        r = eh * 0.42
        px, py = x + gaze[0] * ew * 0.28, ey + gaze[1] * eh * 0.22
        d.ellipse((px - r, py - r, px + r, py + r), fill=(25, 25, 35))
        if eye == "droop":  # heavy upper lid leaves a slit
            d.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, ey + eh * 0.3), fill=dark_skin)
            d.line((box[0], ey + eh * 0.3, box[2], ey + eh * 0.3), fill=(30, 20, 20), width=lw)
    # mouth
    mx, my = fx, cy + fh * 0.27
    lips = (120, 20, 30)
    if mouth == "smile":
        mw, mh = fw * 0.25, fh * 0.13
        d.pieslice((mx - mw, my - mh, mx + mw, my + mh), 0, 180, fill=lips)
        d.rectangle((mx - mw * 0.7, my, mx + mw * 0.7, my + mh * 0.3), fill=(255, 255, 255))
        d.line((mx - mw - 2 * s, my - 3 * s, mx - mw, my), fill=lips, width=lw)
        d.line((mx + mw + 2 * s, my - 3 * s, mx + mw, my), fill=lips, width=lw)
    elif mouth == "small_open":
        mw, mh = fw * 0.08, fh * 0.06
        d.ellipse((mx - mw, my - mh, mx + mw, my + mh), fill=(50, 10, 15))
    elif mouth == "yawn":
        mw, mh = fw * 0.17, fh * 0.17
        d.ellipse((mx - mw, my - mh * 0.7, mx + mw, my + mh * 1.3), fill=(40, 5, 10), outline=lips)
    else:
        d.line((mx - fw * 0.15, my, mx + fw * 0.15, my), fill=lips, width=lw)
    return face


def _draw_desk_object(
    d: ImageDraw.ImageDraw, kind: str, x: float, y: float, s: float, colour
) -> tuple[float, float, float, float]:
    """Study material lying on the desk, centred at (x, y). Returns its box."""
    if kind == "book":
        w, h = 34 * s, 14 * s
        d.rectangle(
            (x - w / 2 - 2 * s, y - h / 2 - 1, x + w / 2 + 2 * s, y + h / 2 + 2 * s), fill=colour
        )
        d.rectangle((x - w / 2, y - h / 2, x - 1, y + h / 2), fill=(245, 240, 225))
        d.rectangle((x + 1, y - h / 2, x + w / 2, y + h / 2), fill=(245, 240, 225))
        for k in range(1, 4):
            yy = y - h / 2 + k * h / 4
            d.line((x - w / 2 + 2, yy, x - 3, yy), fill=(120, 120, 120))
            d.line((x + 3, yy, x + w / 2 - 2, yy), fill=(120, 120, 120))
    elif kind == "notebook":
        w, h = 24 * s, 16 * s
        d.rectangle(
            (x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=(250, 250, 250), outline=colour
        )
        for k in range(1, 5):
            yy = y - h / 2 + k * h / 5
            d.line((x - w / 2 + 2, yy, x + w / 2 - 2, yy), fill=(110, 140, 220))
        d.line(
            (x + w / 2 + 2 * s, y + h / 2, x + w / 2 + 10 * s, y - h / 4),
            fill=(20, 20, 90),
            width=max(1, int(2 * s)),
        )
        w += 20 * s
    else:  # laptop, lid facing the camera
        w, h = 36 * s, 20 * s
        d.rectangle(
            (x - w / 2, y - h * 0.8, x + w / 2, y + h * 0.2),
            fill=(175, 178, 185),
            outline=(90, 90, 95),
        )
        d.ellipse((x - 3 * s, y - h * 0.35, x + 3 * s, y - h * 0.35 + 6 * s), fill=(230, 230, 235))
        d.rectangle(
            (x - w / 2 - 3 * s, y + h * 0.2, x + w / 2 + 3 * s, y + h * 0.4), fill=(120, 120, 125)
        )
        return (x - w / 2 - 3 * s, y - h * 0.8, x + w / 2 + 3 * s, y + h * 0.4)
    return (x - w / 2 - 2 * s, y - h / 2 - 1, x + w / 2 + 2 * s, y + h / 2 + 2 * s)


def _draw_phone(d: ImageDraw.ImageDraw, x: float, y: float, s: float, lit: bool, lying: bool):
    w, h = (20 * s, 10 * s) if lying else (17 * s, 28 * s)
    d.rectangle((x - w / 2, y - h / 2, x + w / 2, y + h / 2), fill=(15, 15, 20))
    screen = (150, 235, 255) if lit else (45, 55, 70)
    m = 2 * s
    d.rectangle((x - w / 2 + m, y - h / 2 + m, x + w / 2 - m, y + h / 2 - m), fill=screen)
    return (x - w / 2, y - h / 2, x + w / 2, y + h / 2)


def _clip_plan(rng: np.random.Generator, label: int, num_frames: int) -> dict[str, Any]:
    """Per-clip behaviour: the face state of every frame and the context objects."""
    neutral_gaze = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.5, 0.9)))
    plan: dict[str, Any] = {
        "variant": CLASS_NAMES[label].lower(),
        "hand_chin": False,
        "phone": "none",
        "nod": 0.0,
        "tilt": np.zeros(num_frames),
    }
    brow = ["neutral"] * num_frames
    eye = ["open"] * num_frames
    mouth = ["neutral"] * num_frames
    gaze = [neutral_gaze] * num_frames
    turn = [0.0] * num_frames
    if label == ENJOYMENT:
        brow, mouth = ["raised"] * num_frames, ["smile"] * num_frames
        gaze = [(neutral_gaze[0], 0.0)] * num_frames
        if rng.random() < 0.5:
            plan["nod"] = float(rng.uniform(6.0, 10.0))  # nod period in frames
    elif label == CONFUSION:
        brow, mouth = ["furrowed"] * num_frames, ["small_open"] * num_frames
        puzzled = (float(rng.choice([-0.7, 0.7])), -0.6)
        gaze = [puzzled] * num_frames
        plan["hand_chin"] = bool(rng.random() < 0.5)
    elif label == FATIGUE:
        length = int(round(num_frames * rng.uniform(0.25, 0.5)))
        length = min(max(2, length), num_frames)
        start = int(rng.integers(0, num_frames - length + 1))
        yawn = rng.random() < 0.7
        for t in range(start, start + length):
            eye[t] = "droop"
            plan["tilt"][t] = 1.0
            if yawn and abs(t - (start + length / 2 - 0.5)) <= length * 0.35:
                mouth[t] = "yawn"
        plan["variant"] = "fatigue_yawn" if yawn else "fatigue_droop"
    elif label == DISTRACTION:
        if rng.random() < PHONE_IN_HAND_SHARE:
            plan["phone"] = "hand"
            plan["variant"] = "distraction_phone"
        else:
            side = float(rng.choice([-1.0, 1.0]))
            for t in range(num_frames):
                amount = float(rng.uniform(0.7, 1.0))
                turn[t] = side * amount
                gaze[t] = (side * 1.0, float(rng.uniform(-0.3, 0.3)))
            plan["variant"] = "distraction_averted"
    if plan["phone"] == "none" and rng.random() < (0.3 if label == NEUTRALITY else 0.15):
        plan["phone"] = "desk"
    # Blinks everywhere (rare): a closed-eye frame alone is not fatigue.
    for t in range(num_frames):
        if eye[t] == "open" and rng.random() < 0.03:
            eye[t] = "closed"
    plan.update(brow=brow, eye=eye, mouth=mouth, gaze=gaze, turn=turn)
    return plan


@dataclasses.dataclass
class DrawnClip:
    """One clip as drawn, before it is written: the frames, the boxes a detector would give, and
    what was drawn (the plan and the scene), from which captions are written (captions.py)."""

    frames: list[Image.Image]
    face_boxes: list[list[int] | None]  # per frame; None where the detector missed the face
    body_box: list[int] | None
    plan: dict[str, Any]
    scene: str
    ident: dict[str, Any]
    shirt: tuple[int, int, int]
    desk_object: str
    desk_phone_lit: bool
    gains: list[float]  # per frame: the camera's brightness offset
    held_phone: list[list[float]]  # per frame with a phone held up, its box


def draw_clip(
    rng: np.random.Generator, label: int, num_frames: int, width: int, height: int
) -> DrawnClip:
    """Draws one clip of class `label` with `rng` (the clip's own generator)."""
    w, h = width, height
    s = min(w / 160.0, h / 120.0)
    desk_top = int(round(h * 0.72))
    background, scene = _draw_scene(rng, w, h, s, desk_top)
    ident = {
        "skin": _jitter_colour(rng, _SKIN[int(rng.integers(len(_SKIN)))], 12),
        "hair": _jitter_colour(rng, _HAIR[int(rng.integers(len(_HAIR)))], 12),
        "long_hair": bool(rng.random() < 0.4),
    }
    shirt = _random_colour(rng, 20, 235)
    fw = float(rng.uniform(36, 44)) * s
    fh = fw * 1.2
    cx0 = w / 2 + float(rng.uniform(-12, 12)) * s
    cy0 = h * 0.36 + float(rng.uniform(-3, 3)) * s
    plan = _clip_plan(rng, label, num_frames)
    side = float(rng.choice([-1.0, 1.0]))  # phone hand / object side
    obj_kind = ("book", "notebook", "laptop")[int(rng.integers(3))]
    obj_colour = _random_colour(rng)
    obj_x = cx0 - side * float(rng.uniform(0, 14)) * s
    obj_y = desk_top + 12 * s
    desk_phone_x = cx0 + side * float(rng.uniform(30, 44)) * s
    desk_phone_lit = bool(rng.random() < 0.3)
    hand_colour = tuple(max(0, v - 15) for v in ident["skin"])
    miss_rate = float(rng.uniform(0, 2 * FACE_BOX_MISS_RATE))

    union = [math.inf, math.inf, -math.inf, -math.inf]

    def grow(box):
        union[0], union[1] = min(union[0], box[0]), min(union[1], box[1])
        union[2], union[3] = max(union[2], box[2]), max(union[3], box[3])

    frames: list[Image.Image] = []
    face_boxes: list[list[int] | None] = []
    gains: list[float] = []
    held_phone: list[list[float]] = []
    drift = np.zeros(2)
    for t in range(num_frames):
        drift = np.clip(drift + rng.normal(0, 0.4, 2), -1.5, 1.5)
        nod = 0.0
        if plan["nod"]:
            nod = math.sin(2 * math.pi * t / plan["nod"]) * 0.08 * fh
        cx = cx0 + drift[0] * s
        cy = cy0 + drift[1] * s + nod + plan["tilt"][t] * 0.12 * fh
        img = background.copy()
        d = ImageDraw.Draw(img)
        # torso, neck and shoulders
        d.rounded_rectangle(
            (cx - 0.95 * fw, cy0 + 0.5 * fh, cx + 0.95 * fw, h + 10 * s),
            radius=int(10 * s),
            fill=shirt,
        )
        d.rectangle(
            (cx - 0.15 * fw, cy + 0.35 * fh, cx + 0.15 * fw, cy0 + 0.6 * fh), fill=ident["skin"]
        )
        grow((cx - 0.95 * fw, cy0 + 0.5 * fh, cx + 0.95 * fw, h))
        # the desk is in front of the torso
        desk = background.crop((0, desk_top, w, h))
        img.paste(desk, (0, desk_top))
        grow(_draw_desk_object(d, obj_kind, obj_x, obj_y, s, obj_colour))
        if plan["phone"] == "desk":
            grow(_draw_phone(d, desk_phone_x, desk_top + 8 * s, s, desk_phone_lit, lying=True))
        face = _draw_face(
            d,
            cx,
            cy,
            fw,
            fh,
            ident,
            plan["brow"][t],
            plan["eye"][t],
            plan["mouth"][t],
            plan["gaze"][t],
            plan["turn"][t],
            s,
        )
        grow((face[0] - 3 * s, face[1] - 5 * s, face[2] + 3 * s, face[3]))
        # hands: resting on the desk, one may be at the chin or holding a phone up
        hr = 5.5 * s
        for hs in (-1, 1):
            hx, hy = cx0 + hs * 0.55 * fw, desk_top + 5 * s
            if plan["phone"] == "hand" and hs == side:
                # elbow on the desk, forearm straight up, beside and below the face crop
                hx = cx0 + side * (fw / 2 + 36 * s)
                hy = cy0 + 0.25 * fh
                d.line((hx, desk_top + 4 * s, hx, hy), fill=shirt, width=int(9 * s))
                held = _draw_phone(d, hx, hy - 12 * s, s, lit=True, lying=False)
                held_phone.append([round(v, 2) for v in held])
                grow(held)
            elif plan["hand_chin"] and hs == side:
                hx, hy = cx + side * 0.1 * fw, cy + 0.55 * fh
                d.line(
                    (cx0 + side * 0.6 * fw, desk_top + 4 * s, hx, hy), fill=shirt, width=int(9 * s)
                )
            d.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=hand_colour, outline=(60, 40, 30))
            grow((hx - hr, hy - hr, hx + hr, hy + hr))
        # camera: brightness flicker and sensor noise
        arr = np.asarray(img, dtype=np.int16)
        gain = float(rng.uniform(-8, 8))
        arr = arr + gain + rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        frames.append(img)
        gains.append(gain)
        box = None
        if rng.random() >= miss_rate:
            j = rng.integers(-2, 3, size=4)
            box = [
                int(np.clip(round(face[0]) + j[0], 0, w - 2)),
                int(np.clip(round(face[1]) + j[1], 0, h - 2)),
                int(np.clip(round(face[2]) + j[2], 0, w)),
                int(np.clip(round(face[3]) + j[3], 0, h)),
            ]
            box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
        face_boxes.append(box)
    body = None
    if rng.random() >= BODY_BOX_MISS_RATE:
        m = 3 * s
        body = [
            int(max(0, math.floor(union[0] - m))),
            int(max(0, math.floor(union[1] - m))),
            int(min(w, math.ceil(union[2] + m))),
            int(min(h, math.ceil(union[3] + m))),
        ]
    return DrawnClip(
        frames=frames,
        face_boxes=face_boxes,
        body_box=body,
        plan=plan,
        scene=scene,
        ident=ident,
        shirt=shirt,
        desk_object=obj_kind,
        desk_phone_lit=desk_phone_lit,
        gains=gains,
        held_phone=held_phone,
    )


def _render_clip(job: tuple) -> dict[str, Any]:
    """Draws and writes one clip; returns its face boxes, body box and bookkeeping."""
    (clip_dir, seed, index, label, num_frames, width, height, quality) = job
    drawn = draw_clip(np.random.default_rng([seed, 1, index]), label, num_frames, width, height)
    out = Path(clip_dir)
    out.mkdir(parents=True, exist_ok=True)
    face_boxes: dict[str, list[int]] = {}
    for t, (img, box) in enumerate(zip(drawn.frames, drawn.face_boxes, strict=True)):
        name = f"{t + 1:06d}.jpg"
        img.save(out / name, format="JPEG", quality=quality)
        if box is not None:
            face_boxes[name] = box
    return {
        "face_boxes": face_boxes,
        "body_box": drawn.body_box,
        "variant": drawn.plan["variant"],
        "held_phone": drawn.held_phone,
    }


# ----------------------------------------------------------------------------- public API


class SyntheticDataError(errors.BadInputError):
    """Bad arguments to the generator (the CLI prints the message as its `error:` line)."""


def _check_args(
    out_dir: Path,
    num_clips,
    seed,
    label_noise,
    test_fraction,
    width,
    height,
    min_frames,
    max_frames,
    overwrite,
    jpeg_quality,
    num_classes,
) -> None:
    def bad(msg):
        raise SyntheticDataError(msg)

    if not 2 <= num_classes <= len(CLASS_NAMES):
        bad(f"--classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}")

    if not isinstance(num_clips, (int, np.integer)) or num_clips < MIN_CLIPS:
        bad(
            f"--clips must be an integer >= {MIN_CLIPS} (every class in both splits), got {num_clips!r}"
        )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        bad(f"--seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= label_noise < 1.0:
        bad(f"--label-noise must be in [0, 1), got {label_noise}")
    if not 0.0 < test_fraction < 1.0:
        bad(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if width < 64 or height < 48:
        bad(f"--width/--height must be at least 64x48, got {width}x{height}")
    if width > 4096 or height > 4096:
        bad(f"--width/--height must be at most 4096, got {width}x{height}")
    if min_frames < 1 or max_frames < min_frames:
        bad(f"need 1 <= --min-frames <= --max-frames, got {min_frames} and {max_frames}")
    if max_frames > 999999:
        bad(f"--max-frames must be below 1000000, got {max_frames}")
    if not 1 <= jpeg_quality <= 100:
        bad(f"jpeg quality must be in 1..100, got {jpeg_quality}")
    if out_dir.exists() and not out_dir.is_dir():
        bad(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            bad(f"--out {out_dir} is not empty; pass --overwrite to replace it")
        known = {CLIPS_DIR, "train.txt", "test.txt", "face_boxes.json", "body_boxes.json"}
        unknown = sorted(p.name for p in out_dir.iterdir() if p.name not in known)
        if unknown:
            bad(
                f"--overwrite refused: {out_dir} holds files a synthetic dataset does not "
                f"write ({', '.join(unknown[:5])}); remove them yourself"
            )


def generate(
    out_dir: str | os.PathLike,
    num_clips: int,
    seed: int,
    *,
    label_noise: float = 0.02,
    test_fraction: float = 0.2,
    width: int = 160,
    height: int = 120,
    min_frames: int = 16,
    max_frames: int = 48,
    overwrite: bool = False,
    workers: int | None = None,
    jpeg_quality: int = 90,
    num_classes: int = len(CLASS_NAMES),
) -> dict[str, Any]:
    """Writes `num_clips` synthetic clips in the RAER layout to `out_dir`; returns a summary.

    Raises SyntheticDataError (a ValueError) on bad arguments (the CLI prints it as one line).
    `workers` processes draw clips in parallel (default: all cores, at most 8; 0 or 1 = in
    process); the result does not depend on it.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    _check_args(
        out,
        num_clips,
        seed,
        label_noise,
        test_fraction,
        width,
        height,
        min_frames,
        max_frames,
        overwrite,
        jpeg_quality,
        num_classes,
    )
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    labels, is_test, written, noisy = _plan(
        num_clips, seed, label_noise, test_fraction, num_classes
    )
    frames_rng = np.random.default_rng([seed, 0xF4A])
    num_frames = frames_rng.integers(min_frames, max_frames + 1, size=num_clips)
    width_digits = max(4, len(str(num_clips)))
    names = [f"{CLIPS_DIR}/{i + 1:0{width_digits}d}" for i in range(num_clips)]
    jobs = [
        (
            str(out / names[i]),
            seed,
            i,
            int(labels[i]),
            int(num_frames[i]),
            width,
            height,
            jpeg_quality,
        )
        for i in range(num_clips)
    ]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers > 1:
        # spawn: safe when the caller already runs JAX/TF threads (fork is not)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            results = pool.map(_render_clip, jobs, chunksize=max(1, num_clips // (workers * 8)))
    else:
        results = [_render_clip(j) for j in jobs]

    for split, members in (("train", ~is_test), ("test", is_test)):
        lines = [f"{names[i]} {num_frames[i]} {written[i] + 1}\n" for i in np.flatnonzero(members)]
        (out / f"{split}.txt").write_text("".join(lines))
    face = {names[i]: r["face_boxes"] for i, r in enumerate(results)}
    body = {names[i]: r["body_box"] for i, r in enumerate(results) if r["body_box"] is not None}
    (out / "face_boxes.json").write_text(json.dumps(face, sort_keys=True, separators=(",", ":")))
    (out / "body_boxes.json").write_text(json.dumps(body, sort_keys=True, indent=0))

    variants: dict[str, int] = {}
    for r in results:
        variants[r["variant"]] = variants.get(r["variant"], 0) + 1
    splits = {}
    for split, members in (("train", ~is_test), ("test", is_test)):
        idx = np.flatnonzero(members)
        splits[split] = {
            "num_clips": len(idx),
            "class_counts": {
                CLASS_NAMES[c]: int((written[idx] == c).sum()) for c in range(num_classes)
            },
        }
    total_frames = int(num_frames.sum())
    return {
        "out_dir": str(out),
        "num_clips": int(num_clips),
        "seed": int(seed),
        "num_frames": total_frames,
        "frame_size": [int(width), int(height)],
        "splits": splits,
        "label_noise": float(label_noise),
        "num_noisy_labels": len(noisy),
        "noisy_labels": [
            {
                "frames_dir": names[i],
                "drawn": CLASS_NAMES[labels[i]],
                "written": CLASS_NAMES[written[i]],
            }
            for i in noisy
        ],
        "frames_without_face_box": total_frames - sum(len(v) for v in face.values()),
        "clips_without_body_box": num_clips - len(body),
        "variants": dict(sorted(variants.items())),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line; a bad argument prints one `error:` line and exits with status 2."""
    with errors.reported():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
    p = errors.ArgumentParser(prog="python -m caer_jax.data.synthetic", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (the builder's manual_dir)")
    p.add_argument("--clips", type=int, required=True, help=f"number of clips (>= {MIN_CLIPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-noise", type=float, default=0.02, help="share of clips with a wrong label"
    )
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.add_argument("--min-frames", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=48)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--classes", type=int, default=len(CLASS_NAMES), help="draw only the first N classes"
    )
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores, <= 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous synthetic dataset")
    args = p.parse_args(argv)
    summary = generate(
        args.out,
        args.clips,
        args.seed,
        label_noise=args.label_noise,
        test_fraction=args.test_fraction,
        width=args.width,
        height=args.height,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        overwrite=args.overwrite,
        workers=args.workers,
        jpeg_quality=args.jpeg_quality,
        num_classes=args.classes,
    )
    brief = {k: v for k, v in summary.items() if k != "noisy_labels"}
    print(json.dumps(brief, indent=1), file=sys.stdout)
    return summary


if __name__ == "__main__":
    main()
