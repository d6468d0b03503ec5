"""Ablation grid: `python -m caer_jax.ablate --config=configs/synthetic_tiny.py:feature_cache
--workdir=runs/ablation [--streams=face,context,both] [--text_types=class_descriptor,class_names]
[--seeds=0,1,2]`.

Trains one run per (streams, text type, seed) with `trainer.train_and_evaluate`, one after another
in this process, into `<workdir>/<streams>-<text type>-seed<seed>`, and prints a Markdown table of
the best checkpoint's test UAR and WAR, mean +- sample standard deviation over the seeds (as
caer_jax.report; also written to `<workdir>/ablation.md` and `ablation.json`). Meant for the
`feature_cache` variant: the image encoder of a seed is the same in every cell, so its features
are computed by the first run and read by the others. Rerunning resumes: a finished run only
re-evaluates its best checkpoint.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import ml_collections
from absl import flags

from caer_jax import cli, metrics, trainer
from caer_jax.models import caer


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(help_string="Config file of every run of the grid."),
        "workdir": flags.DEFINE_string("workdir", None, "Folder of the runs and the table."),
        "streams": flags.DEFINE_list(
            "streams", ["face", "context", "both"], "config.model.streams values."
        ),
        "text_types": flags.DEFINE_list(
            "text_types",
            ["class_descriptor", "class_names"],
            "config.model.prompt.text_type values.",
        ),
        "seeds": flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values."),
    }


def run_grid(config, workdir: Path, streams, text_types, seeds) -> list[dict]:
    """Trains every cell of the grid; returns one row per (streams, text type) with per-seed
    and summary figures."""

    def cell(stream: str, text_type: str, seed: str) -> ml_collections.ConfigDict:
        c = config.copy_and_resolve_references()
        c.model.streams = stream
        c.model.prompt.text_type = text_type
        c.seed = int(seed)
        return c

    # Every cell's model config first: a mistyped stream or text type fails before any training.
    for stream, text_type in itertools.product(streams, text_types):
        caer.check_model_config(cell(stream, text_type, seeds[0]).model)
    rows = []
    for stream in streams:
        for text_type in text_types:
            results = []
            for seed in seeds:
                summary = trainer.train_and_evaluate(
                    cell(stream, text_type, seed), workdir / f"{stream}-{text_type}-seed{seed}"
                )
                if summary is None:
                    raise RuntimeError("preempted; run the same command again to resume")
                results.append({"seed": int(seed), "uar": summary["uar"], "war": summary["war"]})
            rows.append(summary_row(stream, text_type, results))
    return rows


def summary_row(stream: str, text_type: str, results: list[dict]) -> dict:
    """A cell's row: its per-seed figures and their mean +- sample sd (as caer_jax.report)."""
    row = {"streams": stream, "text_type": text_type, "runs": results}
    for key in ("uar", "war"):
        row[f"{key}_mean"], row[f"{key}_std"] = metrics.mean_and_sd([r[key] for r in results])
    return row


def _spread(mean: float, sd: float | None) -> str:
    return f"{mean:.2f} ± {'n/a' if sd is None else f'{sd:.2f}'}"


def table(rows: list[dict]) -> str:
    seeds = len(rows[0]["runs"])
    lines = [
        f"| streams | text type | test UAR (mean ± sample sd, {seeds} seeds) | test WAR | UAR per seed |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{x['uar']:.1f}" for x in r["runs"])
        lines.append(
            f"| {r['streams']} | {r['text_type']} | {_spread(r['uar_mean'], r['uar_std'])} | "
            f"{_spread(r['war_mean'], r['war_std'])} | {per_seed} |"
        )
    return "\n".join(lines)


def run(argv: list[str], flag: cli.Flags) -> None:
    cli.start(argv, config=flag.config.value, workdir=flag.workdir.value)
    workdir = Path(flag.workdir.value)
    rows = run_grid(
        flag.config.value, workdir, flag.streams.value, flag.text_types.value, flag.seeds.value
    )
    text = table(rows)
    print(text)
    (workdir / "ablation.md").write_text(text + "\n")
    (workdir / "ablation.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
