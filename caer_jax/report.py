"""Prints a table of the metrics.json of several runs: `python -m caer_jax.report RUN_DIR...`.

The per-class columns are the classes of the first run (its label set); every run must have them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from caer_jax import label_sets


def _read(workdir: str) -> dict:
    path = Path(workdir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics; train or evaluate that run first")
    return json.loads(path.read_text())


def table(workdirs: list[str]) -> str:
    runs = [_read(w) for w in workdirs]
    class_names = list(runs[0]["per_class"])
    header = f"{'run':<28} {'streams':<8} {'split':<10} {'UAR':>6} {'WAR':>6}  " + " ".join(
        f"{name[:5]:>6}" for name in class_names
    )
    rows = [header, "-" * len(header)]
    for workdir, m in zip(workdirs, runs, strict=True):
        label_sets.check_same_classes(
            list(m["per_class"]), f"{workdir}/metrics.json", class_names, f"{workdirs[0]}"
        )
        recalls = " ".join(f"{m['per_class'][name]['recall'] or 0:6.1f}" for name in class_names)
        rows.append(
            f"{Path(workdir).name:<28} {m['streams']:<8} {m['split']:<10} "
            f"{m['uar']:6.2f} {m['war']:6.2f}  {recalls}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    workdirs = sys.argv[1:] if argv is None else argv
    if not workdirs:
        sys.exit("usage: python -m caer_jax.report RUN_DIR [RUN_DIR ...]")
    print(table(workdirs))


if __name__ == "__main__":
    main()
