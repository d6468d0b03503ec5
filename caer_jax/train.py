"""Training: `python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/tiny`.

Trains CLIP-CAER as the config says (caer_jax.trainer.train_and_evaluate): each epoch ends with an
evaluation on the selection split and a checkpoint; the best checkpoint by UAR is evaluated on the
test split at the end. Run again with the same flags to resume.
"""

from __future__ import annotations

from absl import flags

from caer_jax import cli


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "workdir": flags.DEFINE_string(
            "workdir", None, "Directory for checkpoints, logs and metrics."
        ),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    config, workdir = flag.config.value, flag.workdir.value
    cli.start(argv, config=config, workdir=workdir)
    from caer_jax import trainer  # the library loads once the arguments are known good (cli)

    results = trainer.train_and_evaluate(config, workdir)
    if results is None:
        print(f"preempted; run the same command again to resume from {workdir}")
        return
    print(f"test UAR {results['uar']:.2f} WAR {results['war']:.2f} (workdir {workdir})")


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
