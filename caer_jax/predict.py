"""Inference on a new clip: `python -m caer_jax.predict --config=... --workdir=... [--step=best] PATH`.

PATH is a video file (anything OpenCV's VideoCapture reads) or a folder of frame images (read in
sorted file-name order). The clip is prepared as the dataset builder and the eval pipeline prepare
a RAER clip: `config.data.num_segments` frames sampled with the eval formula, the largest face of
each sampled frame found by OpenCV's bundled Haar cascade and cropped with the builder's 20 px
margin rule (the whole frame when no face is found), context = the whole frame letterboxed (no
body box), both at `config.data.image_size`, pixels in [0, 1]. Prints the class probabilities and
the predicted class (`--json`: one JSON line instead) and writes a PNG of what the model saw and
answered (`--figure`, default WORKDIR/predict/<PATH's name>.png; see predict_figure.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from PIL import Image

from caer_jax import checkpoint, cli, errors, label_sets, predict_figure
from caer_jax import state as state_lib
from caer_jax.data import augment, sampling
from caer_jax.models import caer
from tfds_raer.raer import raer_lib

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
# detectMultiScale settings: OpenCV's customary values for frontal faces.
DETECT_SCALE_FACTOR = 1.1
DETECT_MIN_NEIGHBORS = 5
DETECT_MIN_SIZE = (30, 30)


class PredictInputError(errors.BadInputError):
    """PATH cannot be read as a clip; the message names the path."""


# ----------------------------------------------------------------------------- reading frames


def _video_frames(path: Path, wanted: Any) -> tuple[int, dict[int, Image.Image]]:
    """(number of frames, {index: RGB image}) for the frame indices `wanted(num_frames)` asks."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise PredictInputError(f"{path}: cannot open as a video (OpenCV VideoCapture failed)")
    try:
        # The frame count in the container header is unreliable; count by grabbing (no decoding).
        num_frames = 0
        while capture.grab():
            num_frames += 1
    finally:
        capture.release()
    if num_frames == 0:
        raise PredictInputError(f"{path}: no decodable video frames")
    indices = set(wanted(num_frames).tolist())
    frames: dict[int, Image.Image] = {}
    capture = cv2.VideoCapture(str(path))
    try:
        for i in range(max(indices) + 1):
            if not capture.grab():
                raise PredictInputError(f"{path}: video ended at frame {i} of {num_frames}")
            if i in indices:
                ok, bgr = capture.retrieve()
                if not ok:
                    raise PredictInputError(f"{path}: cannot decode frame {i}")
                frames[i] = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return num_frames, frames


def _folder_frames(path: Path, wanted: Any) -> tuple[int, dict[int, Image.Image]]:
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.name.lower().endswith(raer_lib.IMAGE_SUFFIXES) and not p.name.startswith(".")
    )
    if not names:
        raise PredictInputError(
            f"{path}: folder holds no image files ({', '.join(raer_lib.IMAGE_SUFFIXES)})"
        )
    frames = {}
    for i in sorted(set(wanted(len(names)).tolist())):
        try:
            frames[i] = raer_lib.load_rgb(epath.Path(path) / names[i])
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise PredictInputError(f"{path / names[i]}: cannot decode image: {e}") from None
    return len(names), frames


def read_clip(path: str | Path, num_segments: int, duration: int) -> tuple[int, list[Image.Image]]:
    """(number of frames in the clip, the sampled frames in model order) of a video or folder."""
    path = Path(path)

    def wanted(num_frames: int) -> np.ndarray:
        offsets = sampling.eval_indices(num_frames, num_segments, duration)
        return sampling.frame_indices(offsets, duration, num_frames)

    if path.is_dir():
        num_frames, frames = _folder_frames(path, wanted)
    elif path.is_file():
        num_frames, frames = _video_frames(path, wanted)
    else:
        raise PredictInputError(f"{path}: no such video file or frame folder")
    return num_frames, [frames[i] for i in wanted(num_frames).tolist()]


# ----------------------------------------------------------------------------- faces


@functools.cache
def face_detector() -> cv2.CascadeClassifier:
    detector = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
    if detector.empty():
        raise RuntimeError(f"cannot load OpenCV's {HAAR_CASCADE} from {cv2.data.haarcascades}")
    return detector


def detect_face(img: Image.Image) -> tuple[float, float, float, float] | None:
    """The largest face as [left, upper, right, lower] (the box files' convention), or None."""
    gray = cv2.cvtColor(np.asarray(img.convert("RGB")), cv2.COLOR_RGB2GRAY)
    found = face_detector().detectMultiScale(
        gray,
        scaleFactor=DETECT_SCALE_FACTOR,
        minNeighbors=DETECT_MIN_NEIGHBORS,
        minSize=DETECT_MIN_SIZE,
    )
    if len(found) == 0:
        return None
    x, y, w, h = max((tuple(int(v) for v in box) for box in found), key=lambda b: b[2] * b[3])
    return float(x), float(y), float(x + w), float(y + h)


def prepare_clip(
    frames: list[Image.Image], image_size: int
) -> tuple[np.ndarray, np.ndarray, list[list[float] | None]]:
    """face, context float32 [T, S, S, 3] in [0, 1] and the face box of each frame (or None),
    cropped by the builder's functions and converted as the eval pipeline converts."""
    boxes = [detect_face(img) for img in frames]
    faces = [raer_lib.crop_face(img, box) for img, box in zip(frames, boxes, strict=True)]
    contexts = [raer_lib.crop_context(img, None, image_size) for img in frames]
    return (
        augment.transform_frames(faces, image_size),
        augment.transform_frames(contexts, image_size),
        [None if b is None else list(b) for b in boxes],
    )


# ----------------------------------------------------------------------------- model


def _require_checkpoints(workdir: str | Path) -> None:
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir() or not any(directory.iterdir()):
        raise errors.MissingInputError(
            f"no checkpoints in {directory}; train first, or give --workdir of a trained run"
        )


def restore_params(
    config: ml_collections.ConfigDict, workdir: str | Path, step: str | int = "best"
) -> tuple[Any, Any, int]:
    """(model, params on one device, the step restored) from `workdir`'s checkpoints."""
    _require_checkpoints(workdir)
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    try:
        resolved = ckpts.resolve_step(step)
        model, _ = caer.build_model(
            config.model,
            prompt_token_ids=checkpoint.saved_prompt_token_ids(ckpts.read_meta(resolved)),
            num_frames=config.data.num_segments,
        )
        abstract = state_lib.abstract_params(model, config)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = checkpoint.with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
        params, _ = ckpts.restore_params(resolved, target, config=config)
    finally:
        ckpts.close()
    return model, params, resolved


def _probabilities(params: Any, face, context, *, model, streams: str):
    face = face if streams in ("face", "both") else None
    context = context if streams in ("context", "both") else None
    logits, _ = model.apply({"params": params}, face, context, train=False)
    return jax.nn.softmax(logits, axis=-1)


def predict_clip(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    path: str | Path,
    step: str | int = "best",
    figure: str | Path | None = None,
) -> dict:
    """Class probabilities of the clip at `path` under the checkpoint `step` of `workdir`; with
    `figure`, also a PNG there of the sampled frames, both streams' crops and the probabilities.

    Returns a JSON-able dict: path, step, num_frames, frame_indices, face_boxes (per sampled
    frame, None where no face was found), frames_without_face, probabilities {class: p} in class
    order, prediction, figure (its path or None), warnings.
    """
    d = config.data
    _require_checkpoints(workdir)  # before decoding a long video
    num_frames, frames = read_clip(path, d.num_segments, d.duration)
    face, context, boxes = prepare_clip(frames, d.image_size)
    warnings = []
    missing = sum(b is None for b in boxes)
    if missing:
        warnings.append(
            f"{path}: no face found in {missing} of {len(boxes)} sampled frames; the whole frame "
            "is used as the face crop there"
        )
        logging.warning(warnings[-1])

    model, params, resolved = restore_params(config, workdir, step)
    fn = jax.jit(functools.partial(_probabilities, model=model, streams=config.model.streams))
    probs = np.asarray(jax.device_get(fn(params, face[None], context[None])))[0]
    offsets = sampling.eval_indices(num_frames, d.num_segments, d.duration)
    class_names = label_sets.load(config.model.label_set).class_names
    frame_indices = sampling.frame_indices(offsets, d.duration, num_frames).tolist()
    prediction = class_names[int(probs.argmax())]
    if figure is not None:
        predict_figure.plot_prediction(
            figure,
            frames=frames,
            frame_indices=frame_indices,
            boxes=boxes,
            face=face,
            context=context,
            probabilities=probs,
            class_names=class_names,
            title=f"{path}: {prediction} (checkpoint step {resolved}, streams "
            f"{config.model.streams}, {len(boxes) - missing}/{len(boxes)} frames with a face)",
            streams=config.model.streams,
        )
    return {
        "path": str(path),
        "step": int(resolved),
        "num_frames": int(num_frames),
        "frame_indices": frame_indices,
        "face_boxes": boxes,
        "frames_without_face": int(missing),
        "probabilities": {name: float(p) for name, p in zip(class_names, probs, strict=True)},
        "prediction": prediction,
        "figure": None if figure is None else str(figure),
        "warnings": warnings,
    }


def format_result(result: dict) -> str:
    """Human-readable lines: the prediction, then the classes by decreasing probability."""
    lines = [
        f"{result['path']}: {result['prediction']} (checkpoint step {result['step']}, "
        f"{len(result['face_boxes']) - result['frames_without_face']}/"
        f"{len(result['face_boxes'])} sampled frames with a face)"
    ]
    ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
    lines += [f"  {name:<12} {p:.4f}" for name, p in ranked]
    if result["figure"]:
        lines.append(f"figure: {result['figure']}")
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "workdir": flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/."),
        "step": flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step number."),
        "json": flags.DEFINE_bool("json", False, "Print the result as one JSON line."),
        "figure": flags.DEFINE_string(
            "figure",
            None,
            "Where to write the clip's PNG (frames, face boxes, both streams' crops, "
            "probabilities); default WORKDIR/predict/<PATH's name>.png.",
        ),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    if len(argv) != 2:
        raise errors.BadInputError("expected exactly one PATH (a video file or a folder of frames)")
    config, workdir = flag.config.value, flag.workdir.value
    cli.start(argv[:1], config=config, workdir=workdir)
    figure = flag.figure.value or Path(workdir) / "predict" / f"{Path(argv[1]).name}.png"
    result = predict_clip(config, workdir, argv[1], step=flag.step.value, figure=figure)
    print(json.dumps(result) if flag.json.value else format_result(result))


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
