"""Checkpoints through an orbax CheckpointManager: the last K steps and the best by UAR.

A checkpoint holds the train state, the config it was trained with and a small metadata record
(epoch, selection protocol, metrics). Restoring takes an abstract state whose leaves carry
shardings, so a checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from caer_jax.state import TrainState

SELECTION_METRIC = "uar"


def _selection_metric(metrics: dict) -> float:
    return metrics[SELECTION_METRIC]


class Checkpoints:
    """Saves and restores TrainStates under `workdir/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 2, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=keep),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=_selection_metric, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_selection_metric,
            best_mode="max",
            preservation_policy=None if read_only else policy,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "config", "meta"), options=options
        )

    def save(
        self,
        state: TrainState,
        *,
        config: ml_collections.ConfigDict,
        meta: dict,
        metrics: dict | None = None,
    ) -> None:
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(config.to_dict()),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def resolve_step(self, which: str | int) -> int:
        """'latest', 'best' or a step number -> a step that exists, or a clear error."""
        steps = self.manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if which == "latest":
            return self.manager.latest_step()
        if which == "best":
            return self.manager.best_step()
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {steps}"
            )
        return step

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
        """The state at `step` laid out like `target` (ShapeDtypeStructs with shardings)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.config, restored.meta

    def metadata(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
