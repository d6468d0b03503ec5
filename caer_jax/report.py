"""Prints a table of the metrics.json of several runs: `python -m caer_jax.report RUN_DIR...`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from caer_jax.prompts import CLASS_NAMES


def table(workdirs: list[str]) -> str:
    header = f"{'run':<28} {'streams':<8} {'split':<10} {'UAR':>6} {'WAR':>6}  " + " ".join(
        f"{name[:5]:>6}" for name in CLASS_NAMES
    )
    rows = [header, "-" * len(header)]
    for workdir in workdirs:
        path = Path(workdir) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no metrics; train or evaluate that run first")
        m = json.loads(path.read_text())
        recalls = " ".join(f"{m['per_class'][name]['recall'] or 0:6.1f}" for name in CLASS_NAMES)
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
