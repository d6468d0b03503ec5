"""python -m caer_jax.ablate: a grid of tiny runs from the feature cache, its table, and a
mistyped cell refused before any cell trains."""

import json

import numpy as np
import pytest
import tiny_runs

from caer_jax import ablate, errors

SETTINGS = {"data.num_segments": 4, "train.num_epochs": 1, "model.clip.vision_layers": 1}


def test_a_grid_trains_every_cell_and_tables_its_runs(tmp_path):
    config = tiny_runs.config(tiny_runs.overrides(tmp_path, **SETTINGS), "feature_cache")
    grid = tmp_path / "grid"
    rows = ablate.run_grid(config, grid, ["face", "both"], ["class_names"], ["0", "1"])
    assert [(r["streams"], r["text_type"]) for r in rows] == [
        ("face", "class_names"),
        ("both", "class_names"),
    ]
    for row in rows:
        assert [run["seed"] for run in row["runs"]] == [0, 1]
        for run in row["runs"]:
            folder = grid / f"{row['streams']}-class_names-seed{run['seed']}"
            metrics = json.loads((folder / "metrics.json").read_text())
            assert (metrics["uar"], metrics["war"]) == (run["uar"], run["war"])
            trained = metrics["train_config"]
            assert (trained["seed"], trained["model"]["streams"]) == (run["seed"], row["streams"])
            assert trained["model"]["prompt"]["text_type"] == "class_names"
        uar = [run["uar"] for run in row["runs"]]
        assert row["uar_mean"] == pytest.approx(np.mean(uar))
        assert row["uar_std"] == pytest.approx(np.std(uar))
    # One feature cache per seed (the random encoder is the seed's), shared by both cells.
    caches = [p for p in tmp_path.rglob("feature_cache") if p.is_dir()]
    assert len(caches) == 1 and len(list(caches[0].iterdir())) == 2
    table = ablate.table(rows).splitlines()
    assert table[0].startswith("| streams | text type | test UAR (mean ± std, 2 seeds)")
    assert table[2].startswith(f"| face | class_names | {rows[0]['uar_mean']:.2f} ± ")


def test_a_mistyped_cell_is_refused_before_any_cell_trains(tmp_path):
    config = tiny_runs.config(tiny_runs.overrides(tmp_path, **SETTINGS), "feature_cache")
    with pytest.raises(errors.BadInputError, match="config.model.streams='faces'"):
        ablate.run_grid(config, tmp_path / "grid", ["face", "faces"], ["class_names"], ["0"])
    with pytest.raises(errors.BadInputError, match="config.model.prompt.text_type='nope'"):
        ablate.run_grid(config, tmp_path / "grid", ["face"], ["class_names", "nope"], ["0"])
    assert not (tmp_path / "grid").exists() and not (tmp_path / "tfds").exists()
