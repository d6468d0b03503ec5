"""Evaluation: `python -m caer_jax.eval --config=... --workdir=... [--step=best|latest|N] [--split=test]`.

Prints WAR, UAR and per-class recall with their bootstrap confidence intervals and writes
metrics.json, confusion_matrix.png and predictions.csv into the workdir (with a `_<split>` suffix
for splits other than the config's).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from caer_jax import cli, evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step number.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")


def run(argv=()) -> None:
    cli.start(argv, config=_CONFIG.value, workdir=_WORKDIR.value)
    config = _CONFIG.value
    summary = evaluation.evaluate_checkpoint(
        config, _WORKDIR.value, step=_STEP.value, split=_SPLIT.value or config.data.eval_split
    )
    intervals = summary["bootstrap"]

    def ci(bounds: list[float] | None) -> str:
        return "" if bounds is None else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"

    print(
        f"{summary['split']} step {summary['step']}: UAR {summary['uar']:.2f}"
        f"{ci(intervals['uar'])} WAR {summary['war']:.2f}{ci(intervals['war'])} over "
        f"{summary['num_clips']} clips ({100 * intervals['confidence']:g} % bootstrap intervals)"
    )
    for name, row in summary["per_class"].items():
        recall = "n/a" if row["recall"] is None else f"{row['recall']:.2f}"
        print(
            f"  {name:<12} recall {recall:>6}{ci(intervals['recall'][name])} "
            f"support {row['support']}"
        )


def main() -> None:
    cli.main(run)


if __name__ == "__main__":
    main()
