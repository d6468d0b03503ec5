"""Every command line answers a user's mistake with one `error:` line and exit status 2, and the
authors' checkpoint converts, evaluates, predicts and resumes with no network and no tokenizer.

The commands run in their own processes, as a user runs them. Hub ids meet an endpoint on which
nothing listens (HF_ENDPOINT) and an empty cache (HF_HOME): a machine without network; or a local
server that answers as the hub does for a repository that does not exist.
"""

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_runs
import torch
from test_convert import _tiny_official

import tfds_raer
from caer_jax import errors, trainer
from caer_jax.data import prepare
from caer_jax.models import hub
from configs import synthetic_tiny

# Every test but one runs a command in its own process: left out of `make test-fast`.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TFDS = Path(sys.executable).parent / "tfds"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connections are refused at once
HUB_ID = "openai/clip-vit-base-patch32"
TINY = f"--config={REPO / 'configs/synthetic_tiny.py:scratch'}"


def run(
    argv: list[str], home: Path, timeout: int = 300, hub: str = UNREACHABLE
) -> subprocess.CompletedProcess:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(home / "hf"),
        "HF_ENDPOINT": hub,
    }
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)


def python(
    module: str, *args: str, home: Path, hub: str = UNREACHABLE
) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *args], home, hub=hub)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, one `error:` line (the last) holding every fragment."""
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in err if line.startswith("error:")] == err[-1:], err[-5:]
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


# ---- the mistakes of the table, and flags of every entry point ---------------------------


def test_truncated_authors_checkpoint_is_called_that(tmp_path):
    path, _ = _tiny_official(tmp_path, synthetic_tiny.get_config("scratch"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a partial download
    result = python(
        "caer_jax.convert", f"--official={path}", TINY, f"--workdir={tmp_path / 'w'}", home=tmp_path
    )
    assert_user_error(result, f"{path}: truncated or corrupt torch checkpoint")


def test_foreign_and_missing_checkpoints_name_the_file(tmp_path):
    foreign = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.fc.weight": torch.zeros(3, 2)}}, foreign)
    result = python(
        "caer_jax.convert", f"--official={foreign}", TINY, f"--workdir={tmp_path}", home=tmp_path
    )
    assert_user_error(result, f"{foreign}: cannot convert", "unexpected key 'backbone.fc.weight'")
    missing = tmp_path / "model_best.pth"
    result = python(
        "caer_jax.convert", f"--official={missing}", TINY, f"--workdir={tmp_path}", home=tmp_path
    )
    assert_user_error(result, f"{missing}: no such file")


def test_clip_source_of_random_bytes(tmp_path):
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    result = python(
        "caer_jax.train",
        TINY,
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.clip.source={weights}",
        home=tmp_path,
    )
    # The tokenizer is looked for first (before any data is made): none beside the file.
    assert_user_error(result, f"config.model.clip.source={str(weights)!r}", "vocab.json")


def test_clip_weights_of_random_bytes_are_called_corrupt(tmp_path):
    from caer_jax.models import clip_weights

    # Random bytes fail inside torch's weights-only unpickler in many ways (IndexError on an
    # unbalanced mark for about one file in 16); every one must be reported as corrupt. Fixed
    # seeds, so the test is the same on every run.
    weights = tmp_path / "ViT-B-32.pt"
    for seed in range(200):
        weights.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(clip_weights.WeightsError, match=f"{weights}: truncated or corrupt"):
            clip_weights.load_clip_params(weights)


def test_a_build_of_another_builder_version_is_named(tmp_path):
    config = synthetic_tiny.get_config("scratch")
    config.data.data_dir = str(tmp_path)
    config.data.synthetic.enabled = False
    (tmp_path / "raer/64px/2.0.0").mkdir(parents=True)  # what a 2.0.0 build leaves
    version = tfds_raer.raer.Builder.VERSION
    (tmp_path / f"raer/64px/incomplete.X1_{version}").mkdir()  # an interrupted build
    with pytest.raises(errors.MissingInputError) as raised:
        prepare.prepare_data(config)
    message = str(raised.value)
    assert f"version {version} is not built" in message
    assert "(only version 2.0.0 is there, written by another builder version" in message
    assert "incomplete" not in message and "tfds build tfds_raer/raer" in message


def test_config_file_that_does_not_exist(tmp_path):
    result = python(
        "caer_jax.eval", "--config=configs/nope.py", f"--workdir={tmp_path}", home=tmp_path
    )
    assert_user_error(result, "--config=configs/nope.py: no such config file", "configs/")


@pytest.mark.parametrize(
    "body, line, kind",
    [
        ("def get_config(:\n    pass\n", 1, "SyntaxError: invalid syntax"),
        ("def get_config():\n    steps = 0\n    return 1 / steps\n", 3, "ZeroDivisionError"),
        ("def get_config():\n    return None.field\n", 2, "AttributeError"),
        # Once a config file imported configs/ as a package, absent from other directories.
        (
            "import no_such_package\n",
            1,
            "ModuleNotFoundError: No module named 'no_such_package'",
        ),
    ],
    ids=["syntax", "get_config raises", "attribute of get_config", "import fails"],
)
def test_a_broken_config_file_is_named_with_its_line(tmp_path, body, line, kind):
    config = tmp_path / "mine.py"
    config.write_text(body)
    result = python("caer_jax.train", f"--config={config}", f"--workdir={tmp_path}", home=tmp_path)
    assert_user_error(result, f"--config={config}: {config} line {line}: {kind}")


@pytest.mark.parametrize(
    "module, args, fragments",
    [
        ("caer_jax.eval", [TINY + ",nope"], ["unknown variant 'nope'", "has also scratch"]),
        (
            "caer_jax.eval",
            [TINY, "--workdir=w", "--zero_shot", "--step=best"],
            ["--step=best with --zero_shot"],
        ),
        ("caer_jax.predict", [TINY, "--workdir=w"], ["exactly one PATH"]),
        ("caer_jax.data.synthetic", ["--out=x", "--clips=5"], ["--clips must be an integer >= 10"]),
    ],
)
def test_flag_mistakes(tmp_path, module, args, fragments):
    # One mistake of every command: tests/test_entry_points.py.
    assert_user_error(python(module, *args, home=tmp_path), *fragments)


@pytest.mark.parametrize(
    "module, flag, fragments",
    [
        ("caer_jax.train", "--config.train.batch_size=0", ["config.train.batch_size=0 (expected"]),
        ("caer_jax.eval", "--config.data.num_segments=0", ["config.data.num_segments=0 (expected"]),
        ("caer_jax.train", "--config.model.streams=faces", ["config.model.streams='faces'"]),
        ("caer_jax.train", "--config.model.dtype=float64", ["config.model.dtype='float64'"]),
        (
            "caer_jax.train",
            "--config.model.prompt.text_type=nope",
            ["config.model.prompt.text_type='nope'"],
        ),
        (
            "caer_jax.train",
            "--config.model.label_set=nope.json",
            ["config.model.label_set='nope.json': label set file nope.json not found"],
        ),
    ],
)
def test_config_values_a_run_cannot_use_are_named_before_any_work(
    tmp_path, module, flag, fragments
):
    data = [f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}"]
    assert_user_error(python(module, TINY, *data, flag, home=tmp_path), *fragments)
    assert not (tmp_path / "tfds").exists()  # refused before the data is prepared


def test_a_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("")
    result = python("caer_jax.train", TINY, f"--workdir={workdir}", home=tmp_path)
    assert_user_error(result, f"--workdir={workdir}: is a file")


def test_tfds_build_without_the_manual_dir(tmp_path):
    result = run(
        [
            str(TFDS),
            "build",
            "tfds_raer/raer",
            f"--manual_dir={tmp_path / 'nowhere'}",
            f"--data_dir={tmp_path / 'tfds'}",
            "--config=64px",
        ],
        tmp_path,
    )
    assert_user_error(result, "RAER manual_dir missing", str(tmp_path / "nowhere"))


def test_tfds_build_names_the_bad_annotation_line(tmp_path):
    from caer_jax.data import synthetic

    manual = tmp_path / "raer"
    synthetic.generate(manual, num_clips=10, seed=0, min_frames=2, max_frames=2, workers=1)
    lines = (manual / "train.txt").read_text().splitlines()
    (manual / "train.txt").write_text("\n".join([lines[0].rsplit(" ", 1)[0] + " 9", *lines[1:]]))
    result = run(
        [str(TFDS), "build", "tfds_raer/raer", f"--manual_dir={manual}", "--config=64px"]
        + [f"--data_dir={tmp_path / 'tfds'}"],
        tmp_path,
    )
    assert_user_error(result, f"{manual / 'train.txt'}:1", "label 9 outside 1..5")


def test_only_user_errors_become_the_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info, errors.reported():
        raise errors.BadInputError("config.x: bad\nsecond line")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: config.x: bad; second line\n"
    # Anything else is a bug: it keeps its type and traceback.
    with pytest.raises(ZeroDivisionError), errors.reported():
        _ = 1 / 0


# ---- the authors' checkpoint with no network -----------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny dataset, and a tiny authors'-format checkpoint converted by the CLI offline with
    config.model.clip.source a hub id that no cache holds."""
    root = tmp_path_factory.mktemp("offline")
    settings = tiny_runs.overrides(root, num_clips=10, **{"train.num_epochs": 1})
    config = tiny_runs.config(settings)
    prepare.prepare_data(config)
    path, _ = _tiny_official(root, config)
    flags = [TINY, *tiny_runs.flags(settings), f"--config.model.clip.source={HUB_ID}"]
    start = time.perf_counter()
    result = python(
        "caer_jax.convert", f"--official={path}", f"--workdir={root / 'run'}", *flags, home=root
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    flags.append("--config.model.pixel_normalization=none")  # what convert says to pass
    return root, settings, flags, result, seconds


def test_authors_checkpoint_converts_and_evaluates_offline(converted):
    root, _, flags, result, convert_s = converted
    assert "--config.model.pixel_normalization=none" in result.stdout
    assert "prompt texts not checked" in result.stderr  # no tokenizer: the ids need none
    start = time.perf_counter()
    evaluated = python(
        "caer_jax.eval", *flags, f"--workdir={root / 'run'}", "--step=latest", home=root
    )
    eval_s = time.perf_counter() - start
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["step"] == 0 and metrics["num_clips"] > 0
    assert f"UAR {metrics['uar']:.2f}" in evaluated.stdout
    print(f"offline: convert {convert_s:.1f} s, eval {eval_s:.1f} s (processes, imports included)")


def test_checkpoint_records_the_prompt_token_ids(converted):
    from caer_jax import checkpoint

    root, _, _, _, _ = converted
    ckpts = checkpoint.Checkpoints(root / "run", read_only=True)
    meta = ckpts.read_meta(0)
    ckpts.close()
    ids = checkpoint.saved_prompt_token_ids(meta)
    config = synthetic_tiny.get_config("scratch")
    assert ids.shape == (5, config.model.clip.context_length)
    assert meta["prompt"]["text_type"] == config.model.prompt.text_type
    assert len(meta["prompt"]["class_texts"]) == 5


def test_predict_offline_and_a_video_without_frames(converted, tmp_path):
    root, settings, flags, _, _ = converted
    clip = Path(settings["data.synthetic.manual_dir"]) / "clips" / "0001"
    workdir = f"--workdir={root / 'run'}"
    result = python(
        "caer_jax.predict", *flags, workdir, "--step=latest", "--json", str(clip), home=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 0
    garbage = tmp_path / "clip.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    result = python("caer_jax.predict", *flags, workdir, str(garbage), home=root)
    assert_user_error(result, f"{garbage}: cannot open as a video")


def test_eval_of_a_split_that_does_not_exist(converted):
    root, _, flags, _, _ = converted
    workdir = f"--workdir={root / 'run'}"
    result = python("caer_jax.eval", *flags, workdir, "--step=latest", "--split=val", home=root)
    assert_user_error(result, "split 'val' does not exist", "train, test")


def test_eval_of_a_damaged_checkpoint_names_it(converted, tmp_path):
    root, _, flags, _, _ = converted
    workdir = tmp_path / "run"
    shutil.copytree(root / "run", workdir)
    for path in (workdir / "checkpoints" / "0" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    result = python("caer_jax.eval", *flags, f"--workdir={workdir}", "--step=latest", home=root)
    assert_user_error(result, f"checkpoint {workdir / 'checkpoints' / '0'} cannot be read")
    result = python("caer_jax.eval", *flags, f"--workdir={workdir}", "--step=best", home=root)
    assert_user_error(result, "--step=best: no checkpoint", "was evaluated", "--step=latest")


def test_resume_needs_no_tokenizer(converted, tmp_path, monkeypatch):
    from huggingface_hub import constants

    root, settings, _, _, _ = converted
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.hub_reachable.cache_clear()
    config = tiny_runs.config(settings)
    config.model.clip.source = HUB_ID
    config.model.pixel_normalization = "none"
    workdir = tmp_path / "run"
    shutil.copytree(root / "run", workdir)
    try:
        with pytest.raises(errors.MissingInputError, match="not in the local cache"):
            trainer.train_and_evaluate(config, tmp_path / "fresh")  # a fresh start needs one
        results = trainer.train_and_evaluate(config, workdir)
    finally:
        hub.hub_reachable.cache_clear()
    assert results["step"] == 1 and results["num_clips"] > 0


class _HubWithoutRepositories(http.server.BaseHTTPRequestHandler):
    """Answers every request as huggingface.co answers one for a repository that does not exist
    (or that the caller may not see)."""

    def _repository_not_found(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _repository_not_found

    def log_message(self, *args):
        pass


@pytest.fixture
def reachable_hub():
    """The URL of a hub that is reachable and holds no repository."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubWithoutRepositories)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_hub_id_the_reachable_hub_does_not_have(reachable_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from caer_jax.models import clip_weights

    mistyped = "openai/clip-vit-base-patch-32"
    result = python(
        "caer_jax.train",
        TINY,
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.clip.source={mistyped}",
        home=tmp_path,
        hub=reachable_hub,
    )  # the tokenizer is fetched first
    expected = f"config.model.clip.source={mistyped!r}: not found in the Hugging Face hub"
    assert_user_error(result, expected, reachable_hub, "check the id")
    monkeypatch.setattr(constants, "ENDPOINT", reachable_hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(errors.MissingInputError, match=re.escape(expected)):
            clip_weights.load_clip_params(mistyped)
    finally:
        hub.hub_reachable.cache_clear()
