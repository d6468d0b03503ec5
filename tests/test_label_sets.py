"""Label sets: the built-in five-class RAER set, user sets from JSON, and a four-class set through
the builder, training, evaluation and the checkpoint check."""

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny_runs

from caer_jax import checkpoint, convert, evaluation, label_sets, metrics, prompts, report, trainer
from caer_jax.data import synthetic
from caer_jax.models import caer
from configs import synthetic_tiny
from tfds_raer.raer import raer_lib

FOUR = {
    "name": "coarse4",
    "class_names": ["Calm", "Happy", "Puzzled", "Tired"],
    "texts": {
        "class_descriptor": [
            "Relaxed mouth, open eyes.",
            "Upturned mouth, sparkling eyes.",
            "Furrowed eyebrows, puzzled gaze.",
            "Mouth opens in a yawn, eyelids droop.",
        ],
        "class_names": ["Calm.", "Happy.", "Puzzled.", "Tired."],
    },
}


def write_set(tmp_path: Path, data=FOUR) -> str:
    path = tmp_path / "coarse4.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_builtin_five_class_set_is_the_authors():
    raer5 = label_sets.load("raer5")
    assert raer5.class_names == prompts.CLASS_NAMES and raer5.num_classes == 5
    assert raer5.class_texts("class_names")[4] == "Distraction."
    with pytest.raises(
        label_sets.LabelSetError,
        match="text_type='nope': label set 'raer5' has no texts of that type",
    ):
        raer5.class_texts("nope")


def test_user_set_from_json(tmp_path):
    four = label_sets.load(write_set(tmp_path))
    assert four.name == "coarse4" and four.num_classes == 4
    assert four.class_texts("class_names") == ("Calm.", "Happy.", "Puzzled.", "Tired.")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("texts"), r"missing \['texts'\]"),
        (lambda d: d.update(colour="red"), r"unknown \['colour'\]"),
        (lambda d: d.update(class_names=["A"]), "at least two distinct names"),
        (lambda d: d.update(class_names=["A", "A", "B", "C"]), "at least two distinct names"),
        (lambda d: d["texts"]["class_names"].pop(), r"texts\['class_names'\] has 3 texts for 4"),
        (lambda d: d["texts"].update(class_names="Calm."), "expected a list of non-empty"),
    ],
)
def test_bad_set_files_name_the_file_and_key(tmp_path, change, message):
    data = json.loads(json.dumps(FOUR))
    change(data)
    path = write_set(tmp_path, data)
    with pytest.raises(label_sets.LabelSetError, match=f"{path}: .*{message}"):
        label_sets.load(path)


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(label_sets.LabelSetError, match="neither a built-in set"):
        label_sets.load("raer4")
    with pytest.raises(label_sets.LabelSetError, match="not found"):
        label_sets.load(str(tmp_path / "none.json"))


def test_report_columns_are_the_runs_classes(tmp_path):
    def run(name, classes, right):
        """A metrics.json as evaluation writes it, 2 clips per class, the first `right` right."""
        labels = np.repeat(np.arange(len(classes)), 2)
        preds = np.where(np.arange(len(labels)) < right, labels, (labels + 1) % len(classes))
        summary = metrics.summarize(metrics.confusion_matrix(labels, preds, len(classes)), classes)
        summary.update(
            class_names=list(classes),
            split="test",
            checkpoint="best",
            streams="both",
            train_config=json.loads(json.dumps(synthetic_tiny.get_config("scratch").to_dict())),
            bootstrap=metrics.bootstrap_intervals(
                labels, preds, classes, resamples=50, seed=0, confidence=0.95
            ),
        )
        (tmp_path / name).mkdir()
        metrics.write_json(summary, tmp_path / name / "metrics.json")
        return str(tmp_path / name)

    four = run("four", FOUR["class_names"], right=6)
    header = report.table([four]).splitlines()[0]
    assert header.split()[-4:] == FOUR["class_names"]
    five = run("five", prompts.CLASS_NAMES, right=6)
    with pytest.raises(label_sets.LabelSetError, match="five/metrics.json has the classes"):
        report.table([four, five])


def test_builder_takes_the_range_and_names_from_the_set(tmp_path):
    four = write_set(tmp_path)
    manual = tmp_path / "manual"
    synthetic.generate(manual, 12, seed=1, min_frames=2, max_frames=3, workers=1, num_classes=4)
    labels = [int(line.split()[2]) for line in (manual / "train.txt").read_text().splitlines()]
    assert set(labels) == {1, 2, 3, 4}
    builder = tfds.builder("raer/64px", data_dir=str(tmp_path / "d4"), label_set=four)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    reread = tfds.builder("raer/64px", data_dir=str(tmp_path / "d4"))  # no option: stored names
    assert reread.info.features["label"].names == FOUR["class_names"]
    assert list(reread.info.metadata["statistics"]["train"]["class_counts"]) == FOUR["class_names"]
    assert reread.info.metadata["build_options"]["label_set"] == four
    # a five-class annotation line stops a four-class build, naming the file and line
    lines = (manual / "train.txt").read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:2] + ["5"])
    (manual / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(raer_lib.RaerFormatError, match=r"train\.txt:3: label 5 outside 1\.\.4"):
        tfds.builder(
            "raer/64px", data_dir=str(tmp_path / "other"), label_set=four
        ).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))


@pytest.fixture(scope="module")
def four_class_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    config = tiny_runs.config(tiny_runs.overrides(root, **{"model.label_set": write_set(root)}))
    workdir = root / "run"
    results = trainer.train_and_evaluate(config, workdir)
    return config, workdir, results


@pytest.mark.slow  # a training run
def test_four_class_set_builds_trains_and_evaluates(four_class_run):
    config, workdir, results = four_class_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert list(metrics["per_class"]) == FOUR["class_names"]
    assert np.asarray(metrics["confusion_matrix"]).shape == (4, 4)
    assert metrics["uar"] == pytest.approx(results["uar"])
    with open(workdir / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video_id", "label", "prediction"] + [f"p_{c}" for c in FOUR["class_names"]]
    assert {r[1] for r in rows[1:]} <= set(FOUR["class_names"])
    assert (workdir / "confusion_matrix.png").stat().st_size > 0
    ckpts = checkpoint.Checkpoints(workdir, read_only=True)
    meta = ckpts.read_meta(ckpts.manager.latest_step())
    ckpts.close()
    assert meta["class_names"] == FOUR["class_names"]
    # evaluation from the checkpoint names the same classes
    summary = evaluation.evaluate_checkpoint(config, workdir, step="best", split="test")
    assert list(summary["per_class"]) == FOUR["class_names"]


@pytest.mark.slow  # a training run
def test_five_class_checkpoint_refuses_four_class_data(four_class_run, tmp_path):
    four_config, _, _ = four_class_run
    config = tiny_runs.config(tiny_runs.overrides(tmp_path))
    config.data.data_dir = four_config.data.data_dir  # the four-class dataset
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    params = caer.init_params(
        model, config.model, jax.random.key(0), num_frames=config.data.num_segments
    )
    meta = {"epoch": 0, "protocol": "test", "class_names": list(prompts.CLASS_NAMES)}
    convert.write_checkpoint(params, config, tmp_path / "five", meta)
    with pytest.raises(
        label_sets.LabelSetError,
        match=r"checkpoint .*five/checkpoints/0 has the classes \['Neutrality', 'Enjoyment', "
        r"'Confusion', 'Fatigue', 'Distraction'\], but the dataset raer/64px in .* has "
        r"\['Calm', 'Happy', 'Puzzled', 'Tired'\]",
    ):
        evaluation.evaluate_checkpoint(config, tmp_path / "five", step=0, split="test")
