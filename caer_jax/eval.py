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

from caer_jax import cli, errors


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "workdir": flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/."),
        "step": flags.DEFINE_string("step", "best", "Checkpoint: best, latest or a step number."),
        "split": flags.DEFINE_string(
            "split", None, "Split to evaluate (default: config.data.eval_split)."
        ),
        "zero_shot": flags.DEFINE_bool(
            "zero_shot",
            False,
            "Zero-shot CLIP of config.model.clip.source: no checkpoint (no --step).",
        ),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    config, workdir = flag.config.value, flag.workdir.value
    cli.start(argv, config=config, workdir=workdir)
    from caer_jax import evaluation  # the library loads once the arguments are known good (cli)

    split = flag.split.value or config.data.eval_split
    if flag.zero_shot.value:
        if flag.step.present:
            raise errors.BadInputError(
                f"--step={flag.step.value} with --zero_shot: zero-shot evaluates no checkpoint; "
                "drop one of the two"
            )
        summary = evaluation.evaluate_zero_shot(config, workdir, split=split)
    else:
        summary = evaluation.evaluate_checkpoint(config, workdir, step=flag.step.value, split=split)
    intervals = summary["bootstrap"]
    where = "zero-shot" if flag.zero_shot.value else f"step {summary['step']}"

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
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
