"""`caer_jax.predict` on clips this test writes: a video with a real face (scikit-image's
astronaut), a face-less video and frame folder, and bad inputs; against a tiny trained checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from caer_jax import checkpoint, optim, predict
from caer_jax import state as state_lib
from caer_jax.models import caer
from caer_jax.prompts import CLASS_NAMES
from configs import synthetic_tiny
from tfds_raer.raer import raer_lib

REPO = Path(__file__).resolve().parents[1]
FRAME_SIZE = (320, 240)  # width, height
PASTE = 200  # the astronaut is pasted as PASTE x PASTE pixels at FACE_AT (left, upper)
FACE_AT = (80, 20)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by the project's saver (random tiny model; training it first would
    cost a minute and test nothing predict depends on) and the parameters it holds."""
    workdir = tmp_path_factory.mktemp("predict") / "run"
    config = synthetic_tiny.get_config("scratch")
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    params = caer.init_params(
        model, config.model, jax.random.key(0), num_frames=config.data.num_segments
    )
    state = state_lib.create(params, optim.make_optimizer(params, config.optim, 1))
    ckpts = checkpoint.Checkpoints(workdir)
    ckpts.save(
        state,
        config=config,
        meta={"epoch": 1, "protocol": "test"},
        metrics={"uar": 50.0},
        force=True,
    )
    ckpts.wait()
    ckpts.close()
    return config, workdir, model, params


def face_frame(shift: int = 0) -> np.ndarray:
    """RGB uint8 frame: grey background with the astronaut's head and shoulders pasted on."""
    canvas = np.full((FRAME_SIZE[1], FRAME_SIZE[0], 3), 90, np.uint8)
    astronaut = cv2.resize(skdata.astronaut(), (PASTE, PASTE), interpolation=cv2.INTER_AREA)
    left, upper = FACE_AT[0] + shift, FACE_AT[1]
    canvas[upper : upper + PASTE, left : left + PASTE] = astronaut
    return canvas


def landscape_frame(shift: int = 0) -> np.ndarray:
    rocket = cv2.resize(skdata.rocket(), FRAME_SIZE, interpolation=cv2.INTER_AREA)
    return np.roll(rocket, shift, axis=1)


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, FRAME_SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def check_probabilities(result: dict) -> None:
    probs = result["probabilities"]
    assert list(probs) == list(CLASS_NAMES)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert result["prediction"] == max(probs, key=probs.get)


def test_detector_finds_the_astronaut_and_crops_like_the_builder():
    frame = Image.fromarray(face_frame())
    box = predict.detect_face(frame)
    assert box is not None
    # the box lies on the pasted head (upper-middle of the paste)
    left, upper, right, lower = box
    assert FACE_AT[0] + PASTE / 4 <= (left + right) / 2 <= FACE_AT[0] + 3 * PASTE / 4
    assert FACE_AT[1] <= (upper + lower) / 2 <= FACE_AT[1] + PASTE / 2
    assert predict.detect_face(Image.fromarray(landscape_frame())) is None

    face, context, boxes = predict.prepare_clip([frame], 64)
    assert face.shape == context.shape == (1, 64, 64, 3) and face.dtype == np.float32
    assert boxes == [list(box)]
    # the face crop at its source size, resized as the eval pipeline resizes it
    crop = raer_lib.crop_face(frame, box)
    expected_face = np.asarray(crop.resize((64, 64), Image.BILINEAR), np.float32) / 255
    expected_context = np.asarray(raer_lib.letterbox(frame, 64), np.float32) / 255
    np.testing.assert_allclose(face[0], expected_face, atol=1e-6)
    np.testing.assert_allclose(context[0], expected_context, atol=1e-6)
    # a 4:3 frame letterboxed: black bars top and bottom
    assert context[0, :4].max() == 0.0 and context[0, -4:].max() == 0.0


@pytest.mark.slow  # the CLIP-CAER forward of a whole clip
def test_video_with_a_face(trained, tmp_path):
    config, workdir, model, params = trained
    video = write_video(tmp_path / "face.avi", [face_frame(shift=i) for i in range(12)])
    result = predict.predict_clip(config, workdir, video)
    check_probabilities(result)
    assert result["num_frames"] == 12
    assert len(result["face_boxes"]) == config.data.num_segments
    assert result["frame_indices"] == [0, 2, 3, 5, 6, 8, 9, 11]  # eval formula, 12 -> 8 frames
    assert result["frames_without_face"] == 0 and result["warnings"] == []
    # the restored checkpoint gives what the saved parameters give on the same crops (of the
    # frames as decoded from the video: MJPG noise survives the unantialiased context resize)
    _, frames = predict.read_clip(video, config.data.num_segments, config.data.duration)
    face, context, _ = predict.prepare_clip(frames, config.data.image_size)
    logits, _ = model.apply({"params": params}, face[None], context[None], train=False)
    expected = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    np.testing.assert_allclose(list(result["probabilities"].values()), expected, atol=1e-5)
    text = predict.format_result(result).splitlines()
    assert text[0].startswith(f"{video}: {result['prediction']} (checkpoint step ")
    assert "8/8 sampled frames with a face" in text[0]
    assert [line.split()[0] for line in text[1:]] == sorted(
        CLASS_NAMES, key=lambda c: -result["probabilities"][c]
    )


@pytest.mark.slow  # the CLIP-CAER forward of a whole clip
def test_figure_shows_the_clip_and_its_probabilities(trained, tmp_path):
    config, workdir, model, params = trained
    # magenta frames: no face, so every thumbnail (frame, face crop = whole frame, letterboxed
    # context) is magenta, which nothing else in the figure is
    magenta = np.zeros((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)
    magenta[..., 0] = magenta[..., 2] = 255
    video = write_video(tmp_path / "magenta.avi", [magenta] * 6)
    figure = tmp_path / "figures" / "magenta.png"
    result = predict.predict_clip(config, workdir, video, figure=figure)
    assert result["figure"] == str(figure)
    assert predict.format_result(result).splitlines()[-2] == f"figure: {figure}"
    image = np.asarray(Image.open(figure).convert("RGB")).astype(int)
    # 8 frame columns of 1.4 in plus 3.5 in of bars, 3 rows of 1.4 in plus the title, at 100 dpi
    assert image.shape == (510, 1470, 3)
    is_magenta = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] > 200)
    # 24 thumbnails of about 120 x 120 (the context's 4:3 letterboxed): about 40 % of the pixels
    assert is_magenta.mean() > 0.3
    assert is_magenta[:, 1100:].sum() == 0  # the bar chart on the right holds none
    # and the predicted class's bar is drawn (orange) in the chart
    orange = (image[..., 0] > 230) & (abs(image[..., 1] - 127) < 20) & (image[..., 2] < 40)
    assert orange[:, 1100:].sum() > 1000


@pytest.mark.slow  # the CLIP-CAER forward of a whole clip
def test_faceless_video_and_frame_folder_still_get_a_prediction(trained, tmp_path):
    config, workdir, model, params = trained
    frames = [landscape_frame(shift=3 * i) for i in range(5)]
    video = write_video(tmp_path / "landscape.avi", frames)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):  # mixed formats, sorted by name
        Image.fromarray(frame).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not a frame")
    for path in (video, folder):
        result = predict.predict_clip(config, workdir, path)
        check_probabilities(result)
        assert result["num_frames"] == 5
        assert result["frame_indices"] == [0, 1, 2, 3, 4, 4, 4, 4]  # edge padding
        assert result["frames_without_face"] == 8
        assert result["face_boxes"] == [None] * 8
        assert "no face found in 8 of 8 sampled frames" in result["warnings"][0]


@pytest.mark.slow  # the CLIP-CAER forward of a whole clip
def test_bad_inputs_name_the_path(trained, tmp_path):
    config, workdir, model, params = trained
    missing = tmp_path / "missing.mp4"
    with pytest.raises(predict.PredictInputError, match=f"{missing}: no such"):
        predict.predict_clip(config, workdir, missing)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 50)
    with pytest.raises(predict.PredictInputError, match=f"{garbage}: "):
        predict.predict_clip(config, workdir, garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    with pytest.raises(predict.PredictInputError, match=f"{empty}: folder holds no image files"):
        predict.predict_clip(config, workdir, empty)
    video = write_video(tmp_path / "face.avi", [face_frame()] * 3)
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in {tmp_path / 'nowhere'}"):
        predict.predict_clip(config, tmp_path / "nowhere", video)


def _cli(workdir, path, home, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "caer_jax.predict",
            f"--config={REPO / 'configs/synthetic_tiny.py:scratch'}",
            f"--workdir={workdir}",
            *extra,
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
    )


@pytest.mark.slow  # the command in its own process
def test_cli_json_line_and_clear_error(trained, tmp_path):
    config, workdir, model, params = trained
    video = write_video(tmp_path / "face.avi", [face_frame(shift=i) for i in range(12)])
    result = _cli(workdir, video, tmp_path, "--json", "--step=latest")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    check_probabilities(out)
    assert out["frames_without_face"] == 0
    # the figure goes into the workdir by default
    assert out["figure"] == str(workdir / "predict" / "face.avi.png")
    assert Image.open(out["figure"]).size == (1470, 510)

    missing = tmp_path / "nothing_here"
    result = _cli(workdir, missing, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {missing}: no such video file or frame folder"
    )
