"""The stock `tfds build` command (TFDS's own console script) builds RAER after the normal install.

Each test runs the real `tfds` executable of this virtual environment in its own process, from
the repository root, as the README tells users to, then reads the records back.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from caer_jax.data import clips, synthetic
from tfds_raer.raer.raer_dataset_builder import Builder

# `tfds build` in its own process: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TFDS = Path(sys.executable).parent / "tfds"  # the console script installed by tensorflow-datasets
DUMMY = Path(Builder.code_path).parent / "dummy_data"


def tfds_build(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(TFDS), "build", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def annotations(manual: Path, split: str, file_name: str | None = None) -> dict:
    """{frames_dir: (num_frames, 0-based label)} of an annotation file."""
    rows = {}
    for line in (manual / (file_name or f"{split}.txt")).read_text().splitlines():
        frames_dir, num_frames, label = line.split(" ")
        rows[frames_dir] = (int(num_frames), int(label) - 1)
    return rows


def stored(data_dir: Path, split: str, name: str = "raer/64px") -> dict:
    """{video_id: (num_frames, label)} of the stored clips of `name`; every frame record read."""
    source = clips.ClipSource.open(name, split, str(data_dir))
    records = tfds.data_source(name, split=split, data_dir=str(data_dir))
    assert sum(clip.num_frames for clip in source) == len(records)  # one record per frame
    out = {}
    for clip in source:
        frames = clip.read_all()  # checks each record is the frame the clip table puts there
        assert len(frames["face"]) == len(frames["context"]) == clip.num_frames
        for t in range(clip.num_frames):  # the records agree with the clip table
            record = records[clip.first_record + t]
            assert (record["num_frames"], record["label"]) == (clip.num_frames, clip.label)
        out[clip.video_id] = (clip.num_frames, clip.label)
    assert len(out) == len(source)  # no clip twice
    return out


def test_tfds_build_on_the_synthetic_generator_output(tmp_path):
    manual = tmp_path / "manual"
    synthetic.generate(
        manual, 10, seed=3, min_frames=3, max_frames=5, width=64, height=48, workers=1
    )
    data_dir = tmp_path / "tfds"
    result = tfds_build(
        "tfds_raer/raer", f"--manual_dir={manual}", f"--data_dir={data_dir}", "--config=64px"
    )
    for split in ("train", "test"):
        assert stored(data_dir, split) == annotations(manual, split)
    assert "[raer/64px] train: " in result.stderr
    assert not (data_dir / "raer/224px").exists()  # only the config asked for


def test_tfds_build_options_on_a_hand_made_folder(tmp_path):
    """Options reach the builder as a config of its own in JSON (`tfds build --config='{...}'`,
    any option, path_prefix_map too) or in the dataset name (scalars, with --imports)."""
    manual = tmp_path / "manual"
    shutil.copytree(DUMMY, manual)
    train = (manual / "train.txt").read_text().replace("clips/a02 2 2", "clips/a02 2 9")
    (manual / "train_list.txt").write_text(train)  # a02: label 9, skipped
    (manual / "train.txt").unlink()
    # the test split names the authors' absolute folders, mapped onto manual_dir
    for name in ("test.txt", "face_boxes.json", "body_boxes.json"):
        text = (manual / name).read_text()
        (manual / name).write_text(text.replace("clips/b", "/authors/RAER/clips/b"))
    options = {"skip_bad_clips": True, "max_frames": 2, "train_file": "train_list.txt"}
    prefixes = [["/authors/RAER/", f"{manual}/"]]
    own = {"name": "64px_authors", "image_size": 64, "path_prefix_map": prefixes, **options}
    data_dir = tmp_path / "tfds"
    result = tfds_build(
        "tfds_raer/raer",
        f"--config={json.dumps(own)}",
        f"--manual_dir={manual}",
        f"--data_dir={data_dir}",
    )
    want_train = annotations(manual, "train", "train_list.txt")
    del want_train["clips/a02"]
    want_train = {d: (min(n, 2), y) for d, (n, y) in want_train.items()}
    assert stored(data_dir, "train", "raer/64px_authors") == want_train
    want_test = {d: (min(n, 2), y) for d, (n, y) in annotations(manual, "test").items()}
    assert stored(data_dir, "test", "raer/64px_authors") == want_test
    assert all(d.startswith("/authors/RAER/clips/b") for d in want_test)
    info = tfds.builder("raer/64px_authors", data_dir=str(data_dir)).info.metadata
    assert info["build_options"]["path_prefix_map"] == prefixes
    assert info["build_options"]["image_size"] == 64
    assert info["statistics"]["train"]["skipped"]["by_reason"] == {"bad_label": 1}
    assert "SKIPPED 1 bad clips" in result.stderr

    # Scalars in the name instead, into the data directory of the config named.
    plain = tmp_path / "plain"
    shutil.copytree(DUMMY, plain)
    tfds_build(
        "raer/64px/max_frames=1,jpeg_quality=90",
        "--imports=tfds_raer",
        f"--manual_dir={plain}",
        f"--data_dir={data_dir}",
    )
    assert stored(data_dir, "train") == {
        d: (1, y) for d, (n, y) in annotations(plain, "train").items()
    }
    assert (
        tfds.builder("raer/64px", data_dir=str(data_dir)).info.metadata["build_options"][
            "jpeg_quality"
        ]
        == 90
    )
