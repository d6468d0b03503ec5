"""Prints a table of the metrics.json of several runs: `python -m caer_jax.report RUN_DIR...`.

Each figure comes with its bootstrap confidence interval from metrics.json. Runs whose training
configs differ only by `seed` (e.g. the seed_S folders of launch/seeds.sh) are summarised as one
row, mean +- sample standard deviation over the seeds, with each seed's row below it; runs that
differ otherwise form separate groups. A RUN_DIR without metrics.json whose subfolders hold runs
stands for those runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flax import traverse_util

from caer_jax import errors, label_sets, metrics

USAGE = "usage: python -m caer_jax.report RUN_DIR [RUN_DIR ...]"


class ReportError(errors.BadInputError):
    """A run folder cannot be reported; the message names it."""


@dataclass(frozen=True)
class Run:
    path: Path
    metrics: dict
    folder: Path | None = None  # the RUN_DIR argument it was found under, if not the run itself

    @property
    def seed(self) -> int:
        return self.metrics["train_config"]["seed"]

    def group_key(self) -> str:
        """What must agree for runs to be seeds of one experiment: the training config without
        its seed, the evaluated split and the checkpoint choice."""
        config = {k: v for k, v in self.metrics["train_config"].items() if k != "seed"}
        return json.dumps(
            [config, self.metrics["split"], self.metrics["checkpoint"]], sort_keys=True
        )


def _load(path: Path, folder: Path | None = None) -> Run:
    metrics_path = path / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{metrics_path}: cannot read: {e}") from None
    missing = [key for key in ("bootstrap", "train_config", "class_names") if key not in metrics]
    if missing:
        raise ReportError(
            f"{metrics_path}: no {' or '.join(missing)} (written by an older version); "
            f"evaluate it again with caer_jax.eval"
        )
    return Run(path, metrics, folder)


def load_runs(workdirs: Sequence[str | Path]) -> list[Run]:
    """The runs of `workdirs`, a folder without metrics.json standing for its subfolders' runs."""
    runs = []
    for workdir in map(Path, workdirs):
        if (workdir / "metrics.json").exists():
            runs.append(_load(workdir))
            continue
        children = sorted((p for p in workdir.glob("*/metrics.json")), key=lambda p: p.parent.name)
        if not children:
            raise ReportError(
                f"{workdir}: no metrics.json there or in its subfolders; train or evaluate that "
                "run first"
            )
        runs.extend(_load(p.parent, workdir) for p in children)
    return runs


def group_by_seed(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs that differ only by seed, grouped (in first-seen order, each group by seed)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        group = groups.setdefault(run.group_key(), [])
        twin = next((other for other in group if other.seed == run.seed), None)
        if twin is not None:
            raise ReportError(
                f"{run.path} and {twin.path}: the same config and seed {run.seed}; list each run "
                "once"
            )
        group.append(run)
    return [sorted(group, key=lambda r: r.seed) for group in groups.values()]


def differing_fields(a: Run, b: Run) -> list[str]:
    """Config fields (dotted names, seed aside) and metrics fields by which two runs' groups
    differ."""
    ours = traverse_util.flatten_dict(a.metrics["train_config"], sep=".")
    theirs = traverse_util.flatten_dict(b.metrics["train_config"], sep=".")
    names = [
        f"config.{name}"
        for name in sorted(set(ours) | set(theirs))
        if name != "seed" and ours.get(name) != theirs.get(name)
    ]
    return names + [key for key in ("split", "checkpoint") if a.metrics[key] != b.metrics[key]]


def _interval(value: float | None, bounds: list[float] | None, digits: int) -> str:
    # The interval one digit coarser than the figure: its ends are less certain than the figure.
    if value is None or bounds is None:
        return "n/a"
    return f"{value:.{digits}f} [{bounds[0]:.{digits - 1}f}, {bounds[1]:.{digits - 1}f}]"


def _spread(values: list[float | None], digits: int) -> str:
    if any(v is None for v in values):
        return "n/a"
    mean, sd = metrics.mean_and_sd(values)
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def _cells(run: Run, class_names: Sequence[str]) -> list[str]:
    m, ci = run.metrics, run.metrics["bootstrap"]
    return [
        _interval(m["uar"], ci["uar"], 2),
        _interval(m["war"], ci["war"], 2),
        *(_interval(m["per_class"][n]["recall"], ci["recall"][n], 1) for n in class_names),
    ]


def _summary_cells(group: list[Run], class_names: Sequence[str]) -> list[str]:
    ms = [r.metrics for r in group]
    return [
        _spread([m["uar"] for m in ms], 2),
        _spread([m["war"] for m in ms], 2),
        *(_spread([m["per_class"][n]["recall"] for m in ms], 1) for n in class_names),
    ]


def table(workdirs: Sequence[str | Path]) -> str:
    """The report of `workdirs` as text: one row per run, and per group of runs that differ only
    by seed a mean +- standard deviation row above them. The per-class columns are the classes
    of the first run (its label set); every run must have them."""
    runs = load_runs(workdirs)
    class_names = runs[0].metrics["class_names"]  # the label set's order (per_class is sorted)
    for run in runs:
        label_sets.check_same_classes(
            run.metrics["class_names"],
            f"{run.path}/metrics.json",
            class_names,
            str(runs[0].path),
        )
    groups = group_by_seed(runs)
    confidence = {r.metrics["bootstrap"]["confidence"] for r in runs}
    rows = []  # (label, streams, split, cells)
    for group in groups:
        m = group[0].metrics
        if len(group) > 1:
            parents = {r.path.parent for r in group}
            where = f"{parents.pop()}: " if len(parents) == 1 else ""
            seeds = ",".join(str(r.seed) for r in group)
            label = f"{where}mean +- sd of seeds {seeds}"
            rows.append((label, m["streams"], m["split"], _summary_cells(group, class_names)))
        for run in group:
            label = f"  {run.path}" if len(group) > 1 else str(run.path)
            rows.append(
                (label, run.metrics["streams"], run.metrics["split"], _cells(run, class_names))
            )
    header = ("run", "streams", "split", ["UAR", "WAR", *class_names])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    cell_widths = [max(len(row[3][j]) for row in [header, *rows]) for j in range(len(header[3]))]

    def line(row) -> str:
        left = [text.ljust(width) for text, width in zip(row[:3], widths, strict=True)]
        right = [text.rjust(width) for text, width in zip(row[3], cell_widths, strict=True)]
        return "  ".join(left + right).rstrip()

    lines = [line(header), "-" * len(line(header)), *map(line, rows)]
    levels = ", ".join(f"{100 * c:g} %" for c in sorted(confidence))
    legend = f"[a, b]: {levels} bootstrap interval over the split's clips"
    if any(len(group) > 1 for group in groups):
        legend += "; +- : sample standard deviation over seeds"
    lines.append(legend)
    lines += _notes(runs, groups)
    return "\n".join(lines)


def _notes(runs: Sequence[Run], groups: list[list[Run]]) -> list[str]:
    """Where the runs found under one RUN_DIR fell into several groups: what keeps them apart."""
    group_of = {run.path: i for i, group in enumerate(groups) for run in group}
    first_in: dict[Path, Run] = {}
    notes = []
    for run in runs:
        if run.folder is None:
            continue
        first = first_in.setdefault(run.folder, run)
        if group_of[run.path] != group_of[first.path]:
            notes.append(
                f"note: {run.path} differs from {first.path} in more than the seed "
                f"({', '.join(differing_fields(first, run)[:5])}); not summarised together"
            )
    return notes


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help", "-help"} & set(args):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return
    with errors.reported():
        # RUN_DIRs only: a flag of the other commands here would otherwise read as a missing run.
        flags = [a for a in args if a.startswith("-") and not Path(a).exists()]
        if flags or not args:
            raise errors.BadInputError(
                (f"unknown flag {flags[0]}; " if flags else "") + f"{USAGE} (--help says more)"
            )
        print(table(args))


if __name__ == "__main__":
    main()
