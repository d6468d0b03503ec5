"""Training: `python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/tiny`.

Trains CLIP-CAER as the config says (caer_jax.trainer.train_and_evaluate): each epoch ends with an
evaluation on the selection split and a checkpoint; the best checkpoint by UAR is evaluated on the
test split at the end. Run again with the same flags to resume.
"""

from __future__ import annotations

from typing import Any

from absl import flags
from ml_collections import config_flags

from caer_jax import cli, trainer

# The flags are defined when the command starts (main), not at import: other commands, tests and
# launch scripts import this module's neighbours beside their own flags.
_FLAGS: dict[str, Any] = {}


def run(argv=()) -> None:
    config, workdir = _FLAGS["config"].value, _FLAGS["workdir"].value
    cli.start(argv, config=config, workdir=workdir)
    results = trainer.train_and_evaluate(config, workdir)
    if results is None:
        print(f"preempted; run the same command again to resume from {workdir}")
        return
    print(f"test UAR {results['uar']:.2f} WAR {results['war']:.2f} (workdir {workdir})")


def main() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file.", lock_config=True
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, logs and metrics."
    )
    cli.main(run)


if __name__ == "__main__":
    main()
