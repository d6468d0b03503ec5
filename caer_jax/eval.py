"""Evaluation: `python -m caer_jax.eval --config=... --workdir=... [--step=best|latest|N] [--split=test]`.

Prints WAR, UAR and per-class recall with their bootstrap confidence intervals and writes
metrics.json, confusion_matrix.png and predictions.csv into the workdir (with a `_<split>` suffix
for splits other than the config's).

`--zero_shot` evaluates config.model.clip.source's CLIP as it is, with no checkpoint and no
training: the class texts of config.model.prompt.text_type without context tokens against the
clip's pooled image features (`evaluation.evaluate_zero_shot`); the workdir only receives the
outputs.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from caer_jax import cli, errors, evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step number.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
_ZERO_SHOT = flags.DEFINE_bool(
    "zero_shot", False, "Zero-shot CLIP of config.model.clip.source: no checkpoint (no --step)."
)


def run(argv=()) -> None:
    cli.start(argv, config=_CONFIG.value, workdir=_WORKDIR.value)
    config = _CONFIG.value
    split = _SPLIT.value or config.data.eval_split
    if _ZERO_SHOT.value:
        if _STEP.present:
            raise errors.BadInputError(
                f"--step={_STEP.value} with --zero_shot: zero-shot evaluates no checkpoint; "
                "drop one of the two"
            )
        summary = evaluation.evaluate_zero_shot(config, _WORKDIR.value, split=split)
    else:
        summary = evaluation.evaluate_checkpoint(
            config, _WORKDIR.value, step=_STEP.value, split=split
        )
    intervals = summary["bootstrap"]
    where = "zero-shot" if _ZERO_SHOT.value else f"step {summary['step']}"

    def ci(bounds: list[float] | None) -> str:
        return "" if bounds is None else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"

    print(
        f"{summary['split']} {where}: UAR {summary['uar']:.2f}"
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
