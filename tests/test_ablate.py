"""python -m caer_jax.ablate: a grid of tiny runs from the feature cache, its table, and a
mistyped cell refused before any cell trains."""

import json

import numpy as np
import pytest
import tiny_runs

from caer_jax import ablate, errors

# A grid of training runs: left out of `make test-fast`.
pytestmark = pytest.mark.slow

SETTINGS = {"train.num_epochs": 1}


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
        assert row["uar_std"] == pytest.approx(np.std(uar, ddof=1))
    # One feature cache per seed (the random encoder is the seed's), shared by both cells.
    caches = [p for p in tmp_path.rglob("feature_cache") if p.is_dir()]
    assert len(caches) == 1 and len(list(caches[0].iterdir())) == 2
    table = ablate.table(rows).splitlines()
    assert table[0].startswith("| streams | text type | test UAR (mean ± sample sd, 2 seeds)")
    assert table[2].startswith(f"| face | class_names | {rows[0]['uar_mean']:.2f} ± ")


def test_a_mistyped_cell_is_refused_before_any_cell_trains(tmp_path):
    config = tiny_runs.config(tiny_runs.overrides(tmp_path, **SETTINGS), "feature_cache")
    with pytest.raises(errors.BadInputError, match="config.model.streams='faces'"):
        ablate.run_grid(config, tmp_path / "grid", ["face", "faces"], ["class_names"], ["0"])
    with pytest.raises(errors.BadInputError, match="config.model.prompt.text_type='nope'"):
        ablate.run_grid(config, tmp_path / "grid", ["face"], ["class_names", "nope"], ["0"])
    assert not (tmp_path / "grid").exists() and not (tmp_path / "tfds").exists()


def test_the_spread_over_seeds_is_the_sample_sd_as_in_the_report():
    # UAR 60, 70, 80: sample sd 10 (the population sd, 8.16, understates the spread of 3 seeds);
    # test_report's table gives "70.00 +- 10.00" for the same figures.
    runs = [{"seed": s, "uar": u, "war": u - 10} for s, u in ((0, 60.0), (1, 70.0), (2, 80.0))]
    row = ablate.summary_row("both", "class_names", runs)
    assert (row["uar_mean"], row["uar_std"]) == (70.0, 10.0)
    assert (row["war_mean"], row["war_std"]) == (60.0, 10.0)
    assert "| both | class_names | 70.00 ± 10.00 | 60.00 ± 10.00 |" in ablate.table([row])
    # one seed has no spread: the table says so instead of printing 0
    one = ablate.summary_row("both", "class_names", runs[:1])
    assert one["uar_std"] is None and "| 60.00 ± n/a | 50.00 ± n/a |" in ablate.table([one])
