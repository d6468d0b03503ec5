"""The synthetic RAER-layout generator: layout, determinism, label rules, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caer_jax.data import synthetic
from caer_jax.prompts import CLASS_NAMES

W, H = 160, 120


def _read_split(root: Path, split: str) -> list[tuple[str, int, int]]:
    rows = []
    for line in (root / f"{split}.txt").read_text().splitlines():
        d, n, label = line.split(" ")
        rows.append((d, int(n), int(label)))
    return rows


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "raer"
    summary = synthetic.generate(out, 60, seed=3, min_frames=6, max_frames=12, workers=1)
    return out, summary


def test_layout(dataset):
    root, summary = dataset
    train, test = _read_split(root, "train"), _read_split(root, "test")
    rows = train + test
    assert len(rows) == 60 and summary["num_clips"] == 60
    assert len({d for d, _, _ in rows}) == 60
    assert 3.0 <= len(train) / len(test) <= 5.0
    face = json.loads((root / "face_boxes.json").read_text())
    body = json.loads((root / "body_boxes.json").read_text())
    assert set(face) == {d for d, _, _ in rows}
    assert set(body) <= set(face)
    frames_total = 0
    for d, n, label in rows:
        assert 1 <= label <= 5
        files = sorted(p.name for p in (root / d).iterdir())
        assert len(files) == n and 6 <= n <= 12
        assert files[0] == "000001.jpg"
        frames_total += n
        assert set(face[d]) <= set(files)
        for box in list(face[d].values()) + ([body[d]] if d in body else []):
            left, upper, right, lower = box
            assert all(isinstance(v, int) for v in box)
            assert 0 <= left < right <= W and 0 <= upper < lower <= H
    with Image.open(root / rows[0][0] / "000001.jpg") as im:
        assert im.format == "JPEG" and im.size == (W, H) and im.mode == "RGB"
    assert summary["num_frames"] == frames_total
    missing = frames_total - sum(len(v) for v in face.values())
    assert missing == summary["frames_without_face_box"]
    assert summary["clips_without_body_box"] == 60 - len(body)


def test_class_balance_and_stratified_split(dataset):
    root, summary = dataset
    counts = {}
    for split in ("train", "test"):
        c = np.bincount([label - 1 for _, _, label in _read_split(root, split)], minlength=5)
        counts[split] = c
        assert list(c) == [summary["splits"][split]["class_counts"][n] for n in CLASS_NAMES]
    total = counts["train"] + counts["test"]
    assert int(np.argmax(total)) == 0  # Neutrality the most common
    assert total[0] > total[1] + total[2]
    # with no label noise the split is exactly stratified up to rounding
    root2 = root.parent / "clean"
    synthetic.generate(root2, 100, seed=1, label_noise=0.0, min_frames=2, max_frames=2, workers=1)
    tr = np.bincount([lab - 1 for _, _, lab in _read_split(root2, "train")], minlength=5)
    te = np.bincount([lab - 1 for _, _, lab in _read_split(root2, "test")], minlength=5)
    assert list(tr + te) == [40, 10, 10, 18, 22]
    assert list(te) == [8, 2, 2, 4, 4]


def test_deterministic_whatever_the_workers(tmp_path):
    kw = dict(min_frames=3, max_frames=5)
    a = synthetic.generate(tmp_path / "a", 12, seed=7, workers=1, **kw)
    b = synthetic.generate(tmp_path / "b", 12, seed=7, workers=2, **kw)
    c = synthetic.generate(tmp_path / "c", 12, seed=8, workers=1, **kw)
    files_a = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    files_b = sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files_a == files_b
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "train.txt").read_bytes() != (
        tmp_path / "c" / "train.txt"
    ).read_bytes()
    del a["seconds"], b["seconds"], c["seconds"]
    a["out_dir"] = b["out_dir"]
    assert a == b


def test_label_noise_recorded(tmp_path):
    s = synthetic.generate(tmp_path / "n", 50, seed=0, label_noise=0.1, min_frames=1, max_frames=1)
    assert s["label_noise"] == 0.1 and s["num_noisy_labels"] == 5
    written = {
        d: lab for split in ("train", "test") for d, _, lab in _read_split(tmp_path / "n", split)
    }
    for rec in s["noisy_labels"]:
        assert rec["drawn"] != rec["written"]
        assert CLASS_NAMES[written[rec["frames_dir"]] - 1] == rec["written"]


def test_fatigue_cues_in_one_contiguous_stretch():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        plan = synthetic._clip_plan(rng, synthetic.FATIGUE, 40)
        droop = np.flatnonzero(np.asarray(plan["eye"]) == "droop")
        assert 10 <= len(droop) <= 20
        assert np.all(np.diff(droop) == 1)
        assert set(plan["mouth"]) <= {"neutral", "yawn"}
        yawn = [t for t, m in enumerate(plan["mouth"]) if m == "yawn"]
        assert set(yawn) <= set(droop.tolist())
        outside = [t for t in range(40) if t not in set(droop.tolist())]
        assert all(plan["mouth"][t] == "neutral" and plan["brow"][t] == "neutral" for t in outside)


def test_distraction_phone_outside_face_crop_inside_context(tmp_path):
    seen = 0
    for index in range(12):
        job = (str(tmp_path / f"c{index}"), 0, index, synthetic.DISTRACTION, 4, W, H, 95)
        r = synthetic._render_clip(job)
        if r["variant"] != "distraction_phone":
            assert not r["held_phone"]
            continue
        seen += 1
        bl, bu, br, bd = r["body_box"] or (0, 0, W, H)
        for name in sorted(r["face_boxes"]):
            left, upper, right, lower = r["face_boxes"][name]
            pl, pu, pr, pd = r["held_phone"][int(name[:6]) - 1]
            crop = (left - 20, upper - 20, right + 20, lower + 20)
            apart = pl >= crop[2] or pr <= crop[0] or pu >= crop[3] or pd <= crop[1]
            assert apart, f"clip {index} {name}: phone {pl, pu, pr, pd} in face crop {crop}"
            assert bl <= pl and pr <= br and bu <= pu and pd <= bd
            im = np.asarray(Image.open(tmp_path / f"c{index}" / name).convert("RGB"), np.int32)
            screen = im[
                int(pu) + 3 : int((pu + pd) / 2), int(pl) + 3 : int(pr) - 2
            ]  # above the hand
            assert screen.mean(axis=(0, 1))[2] > 200  # the lit screen is drawn there
    assert seen >= 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clips", "9"], "--clips must be an integer >= 10"),
        (["--clips", "20", "--label-noise", "1.5"], "--label-noise must be in"),
        (["--clips", "20", "--test-fraction", "0"], "--test-fraction must be in"),
        (["--clips", "20", "--min-frames", "9", "--max-frames", "4"], "--min-frames"),
        (["--clips", "20", "--width", "32"], "at least 64x48"),
        (["--clips", "20", "--seed", "-1"], "--seed must be"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    refused(capsys, ["--out", str(tmp_path / "x"), *argv], message)
    assert not (tmp_path / "x").exists()


def refused(capsys, argv, message):
    """The CLI ends with exit status 2 and one `error:` line holding `message`."""
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err


def test_out_dir_checks(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    argv = ["--out", str(out), "--clips", "10", "--min-frames", "1", "--max-frames", "1"]
    refused(capsys, argv, "is not empty; pass --overwrite")
    refused(capsys, [*argv, "--overwrite"], "--overwrite refused.*notes.md")
    (tmp_path / "file").write_text("x")
    refused(capsys, ["--out", str(tmp_path / "file"), "--clips", "10"], "exists and is not a dir")
    refused(capsys, ["--out", str(tmp_path / "y"), "--clips", "ten"], "--clips: invalid int")
    (out / "notes.md").unlink()
    synthetic.main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_clips"] == 10
    first = (out / "train.txt").read_text()
    synthetic.main([*argv[:3], "11", *argv[4:], "--overwrite", "--workers", "1"])
    assert (out / "train.txt").read_text() != first
    assert len(list((out / "clips").iterdir())) == 11
