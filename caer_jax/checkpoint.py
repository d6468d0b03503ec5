"""Checkpoints through an orbax CheckpointManager: the last K steps and the best by UAR.

A checkpoint holds the train state, the config it was trained with and a small metadata record
(epoch, selection protocol, metrics, and the prompts' class texts and token ids, so that a
checkpoint is used without a tokenizer). Restoring takes an abstract state whose leaves carry
shardings, so a checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

import caer_jax
from caer_jax import distributed, errors, label_sets
from caer_jax.state import TrainState

SELECTION_METRIC = "uar"
# Config fields that fix the shapes or meaning of the saved state: restoring under a config that
# differs in any of them is refused.
COMPATIBILITY_KEYS = ("model", "data.num_segments", "data.image_size")
# Fields of those that may differ (they change how the state is used, not what it is).
COMPATIBILITY_EXEMPT = ("model.clip.source", "model.dtype", "model.remat", "model.temporal.dropout")


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit when the code runs from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return caer_jax.__version__
    return f"{caer_jax.__version__}+git.{commit}"


class IncompatibleCheckpointError(errors.BadInputError):
    """The checkpoint was written under a config with other shapes or classes."""


class DamagedCheckpointError(errors.BadInputError):
    """A checkpoint step cannot be read back (truncated, corrupt, or not written by us)."""


def prompt_record(model_cfg: ml_collections.ConfigDict, token_ids: Any) -> dict:
    """What a checkpoint keeps of the prompts: the class texts and the token ids they gave, so
    that evaluation, prediction and a resume rebuild the model without a tokenizer."""
    return {
        "text_type": model_cfg.prompt.text_type,
        "class_texts": list(
            label_sets.load(model_cfg.label_set).class_texts(model_cfg.prompt.text_type)
        ),
        "token_ids": np.asarray(token_ids).tolist(),
    }


def saved_prompt_token_ids(meta: dict) -> np.ndarray | None:
    """The prompt token ids recorded in a checkpoint's metadata; None for checkpoints written
    before they were recorded (the tokenizer then rebuilds them)."""
    record = meta.get("prompt")
    return None if record is None else np.asarray(record["token_ids"], np.int32)


def _flatten(tree: dict) -> dict:
    # Tuples as lists: a config read back from its JSON holds lists where the config has tuples.
    flat = traverse_util.flatten_dict(tree, sep=".")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: Path) -> None:
    """Raises IncompatibleCheckpointError naming the first config field that differs."""
    ours, theirs = _flatten(config.to_dict()), _flatten(saved)
    for name in sorted(set(ours) | set(theirs)):
        if not name.startswith(COMPATIBILITY_KEYS) or name.startswith(COMPATIBILITY_EXEMPT):
            continue
        if ours.get(name) != theirs.get(name):
            raise IncompatibleCheckpointError(
                f"checkpoint {where} was written with config.{name}={theirs.get(name)!r}, "
                f"the config now has {ours.get(name)!r}"
            )


def class_names(meta: dict, default: Sequence[str]) -> list[str]:
    """The class names a checkpoint was trained on; `default` (the config's label set, which
    check_compatible already matched) for checkpoints written before they were recorded."""
    return list(meta["class_names"]) if "class_names" in meta else list(default)


def _selection_metric(metrics: dict) -> float:
    return metrics[SELECTION_METRIC]


RUN_FILE = "fingerprint.txt"  # the fingerprint of the run whose checkpoints the workdir holds


def set_aside_other_run(workdir: Path, fingerprint: str) -> None:
    """Records `fingerprint` (of a run's config and data) in the workdir; checkpoints of another
    fingerprint are renamed checkpoints.<their fingerprint> (kept, not resumed from), so that a
    changed config or data starts afresh."""
    run_file = workdir / RUN_FILE
    previous = run_file.read_text().strip() if run_file.exists() else fingerprint
    checkpoints = workdir / "checkpoints"
    if previous != fingerprint and checkpoints.exists():
        aside = workdir / f"checkpoints.{previous}"
        logging.warning(
            "%s holds checkpoints of another config or data (%s, now %s): moved to %s; "
            "starting afresh",
            checkpoints,
            previous,
            fingerprint,
            aside,
        )
        if aside.exists():
            shutil.rmtree(aside)
        checkpoints.rename(aside)
    if jax.process_index() == 0:
        run_file.write_text(fingerprint + "\n")


def refuse_other_run(fingerprint: str, where: Path, meta: dict) -> None:
    """Raises IncompatibleCheckpointError unless the checkpoint `where` (its metadata `meta`)
    was written by the run of `fingerprint` (a Checkpoints.resume check_meta)."""
    if meta.get("fingerprint") != fingerprint:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was written by a run of another config or data (fingerprint "
            f"{meta.get('fingerprint')}, now {fingerprint}); use another --workdir, or remove "
            "this one to start afresh"
        )


def iterator_layout(start_step: int, worker_count: int) -> dict:
    """What a saved data iterator's position is relative to (the metadata's "data_iterator"):
    the step the iterator started at, the process count that split the batches and the worker
    processes (grain's state has one per worker)."""
    return {
        "start_step": start_step,
        "process_count": jax.process_count(),
        "worker_count": worker_count,
    }


@dataclasses.dataclass
class RunStart:
    """Where a run starts: its newest intact checkpoint (Checkpoints.resume), or afresh (step 0,
    meta None)."""

    step: int
    state: TrainState
    meta: dict | None
    data_iterator: Any  # at the position of `step`
    data_start: int  # the step that iterator started at


class Checkpoints:
    """Saves and restores TrainStates under `workdir/checkpoints`.

    Orbax decides when a save is due (`should_save`): every `save_interval_steps` steps (0:
    never by the step), and at a preemption of a multi-process job (its preemption service).
    The policies are given as such rather than through CheckpointManagerOptions'
    save_interval_steps, whose default policy also saves the first step of every fresh run.
    """

    def __init__(
        self,
        workdir: str | Path,
        keep: int = 2,
        read_only: bool = False,
        save_interval_steps: int = 0,
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        due = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        if save_interval_steps:
            due.append(ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps))
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
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(due),
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config", "meta"), options=options
        )

    @classmethod
    def of_run(cls, workdir: str | Path, train_cfg: ml_collections.ConfigDict) -> Checkpoints:
        """The checkpoints of a training loop: the config.train's keep_checkpoints latest (and
        the best), one every checkpoint_every_steps steps (0: only when the loop forces one)."""
        return cls(
            workdir,
            keep=train_cfg.keep_checkpoints,
            save_interval_steps=train_cfg.checkpoint_every_steps,
        )

    def save(
        self,
        state: TrainState,
        *,
        config: ml_collections.ConfigDict,
        meta: dict,
        metrics: dict | None = None,
        data_iterator: grain.DatasetIterator | None = None,
        force: bool = False,
    ) -> None:
        """Saves asynchronously when a save is due (`should_save`) or `force` says so (an
        evaluated epoch's end, the end of a run, a one-off write); with `data_iterator` also its
        position (exact resume)."""
        step = int(jax.device_get(state.step))
        items = {
            "state": ocp.args.PyTreeSave(state),
            "config": ocp.args.JsonSave(config.to_dict()),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=metrics,
            force=force,
        )

    def should_save(self, step: int) -> bool:
        """Whether orbax's policies (see the class) make `step` a save."""
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """Whether the processes of a multi-process job agreed to stop at `step` (jax's
        preemption service, through orbax); False for a single process."""
        return self.manager.reached_preemption(step)

    def resolve_step(self, which: str | int) -> int:
        """'latest', 'best' or a step number -> a step that exists, or a clear error."""
        steps = self.manager.all_steps()
        if not steps:
            raise errors.MissingInputError(
                f"no checkpoints in {self.directory}; train first (caer_jax.train) or convert "
                "the authors' checkpoint into this workdir (caer_jax.convert)"
            )
        if which == "latest":
            return self.manager.latest_step()
        if which == "best":
            best = self.manager.best_step()
            if best is None:
                raise errors.BadInputError(
                    f"--step=best: no checkpoint in {self.directory} was evaluated (converted or "
                    f"saved mid-epoch); use --step=latest or a step number ({list(steps)})"
                )
            return best
        try:
            step = int(which)
        except ValueError:
            raise errors.BadInputError(
                f"--step={which}: expected best, latest or a step number ({list(steps)})"
            ) from None
        if step not in steps:
            raise errors.MissingInputError(
                f"no checkpoint for step {step} in {self.directory}; steps: {list(steps)}"
            )
        return step

    def restore(
        self,
        step: int,
        target: TrainState,
        *,
        config: ml_collections.ConfigDict | None = None,
        data_iterator: grain.DatasetIterator | None = None,
    ) -> tuple[TrainState, dict]:
        """The state at `step` laid out like `target` (ShapeDtypeStructs with shardings) and the
        checkpoint's metadata. With `config`, refuses an incompatible checkpoint; with
        `data_iterator`, moves that iterator to the saved position."""
        self._check_config(step, config)
        items = {"state": _restore_args(target), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._read(step, **items)
        return restored.state, restored.meta

    def restore_params(
        self, step: int, target: Any, *, config: ml_collections.ConfigDict | None = None
    ) -> tuple[Any, dict]:
        """Only the parameters at `step`, laid out like `target` (abstract parameters with
        shardings), and the metadata. Evaluation and prediction need neither the optimizer state
        (twice the parameters under AdamW) nor the schedule it was built with."""
        self._check_config(step, config)
        items = {
            "state": _restore_args({"params": target}, partial_restore=True),
            "meta": ocp.args.JsonRestore(),
        }
        restored = self._read(step, **items)
        return restored.state["params"], restored.meta

    def recorded_prompt_token_ids(self) -> np.ndarray | None:
        """The prompt token ids of the newest checkpoint whose metadata reads; None when there
        is none, or it was written before the ids were recorded."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return saved_prompt_token_ids(self.read_meta(step))
            except DamagedCheckpointError:
                continue  # restore_newest_intact reports it and sets it aside
        return None

    def read_meta(self, step: int) -> dict:
        """The metadata record of `step` alone."""
        return self._read(step, meta=ocp.args.JsonRestore()).meta

    def _read(self, step: int, **items: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DamagedCheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be read (truncated or corrupt? "
                f"{type(e).__name__}: {first}); choose another step with --step, or train again"
            ) from e

    def read_config(self, step: int) -> dict:
        """The config `step` was trained with, as a dict."""
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        ).config

    def _check_config(self, step: int, config: ml_collections.ConfigDict | None) -> None:
        if config is None:
            return
        check_compatible(self.read_config(step), config, self.directory / str(step))

    def restore_newest_intact(self, restore_fn: Callable[[int], Any]) -> tuple[int, Any] | None:
        """`(step, restore_fn(step))` for the newest step that restores, skipping (and saying so)
        newer ones that are damaged; None when there are no checkpoints at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return step, restore_fn(step)
            except DamagedCheckpointError as error:
                self._skip_damaged(step, error)
            except errors.UserError:
                # About the config or the data (a damaged dataset file read while the iterator
                # is restored), not this checkpoint, which stays as it is.
                raise
            except Exception as error:  # noqa: BLE001  (tensorstore/orbax raise many types)
                self._skip_damaged(step, error)
        if steps:
            raise DamagedCheckpointError(
                f"none of the checkpoints {steps} in {self.directory} can be restored (each is "
                "now set aside as <step>.damaged); use another workdir to start afresh"
            )
        return None

    def resume(
        self,
        target: TrainState,
        *,
        config: ml_collections.ConfigDict,
        new_iterator: Callable[[int], grain.DatasetIterator],
        worker_count: int,
        check_meta: Callable[[Path, dict], None] | None = None,
    ) -> RunStart | None:
        """The newest intact checkpoint's state (laid out like `target`), with a data iterator
        made by new_iterator(start_step) at the saved position; None without checkpoints.
        check_meta(its folder, its metadata) may refuse a checkpoint by raising a UserError.

        The saved position fits an iterator made as the saving run made its own. With another
        process or worker count it does not; the global batches are a function of the step
        alone, so a new iterator starts at the step instead."""

        def restore(step: int) -> RunStart:
            meta = self.read_meta(step)
            if check_meta is not None:
                check_meta(self.directory / str(step), meta)
            saved = meta.get("data_iterator")
            fits = bool(saved) and saved == iterator_layout(saved["start_step"], worker_count)
            if not fits:
                logging.info("data iterator saved as %s; starting it at step %d", saved, step)
            data_start = saved["start_step"] if fits else step
            iterator = new_iterator(data_start)
            try:
                state, meta = self.restore(
                    step, target, config=config, data_iterator=iterator if fits else None
                )
            except BaseException:
                iterator.close()  # its worker processes, before the previous checkpoint is tried
                raise
            return RunStart(step, state, meta, iterator, data_start)

        found = self.restore_newest_intact(restore)
        return None if found is None else found[1]

    def _skip_damaged(self, step: int, error: Exception) -> None:
        logging.warning(
            "checkpoint %s cannot be restored (%s: %s); moved aside to %s.damaged, "
            "trying the previous one",
            self.directory / str(step),
            type(error).__name__,
            str(error)[:300],
            step,
        )
        self._set_aside(step)

    def _set_aside(self, step: int) -> None:
        # Renamed rather than deleted (someone may want to look at it); the run will write this
        # step again.
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / f"{step}.damaged")
        distributed.barrier(f"checkpoint.set_aside.{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _restore_args(target: Any, partial_restore: bool = False) -> ocp.args.PyTreeRestore:
    # PyTree (not Standard) arguments for saving and restoring alike: an orbax manager binds one
    # handler per item, and only the PyTree handler restores a subtree (partial_restore).
    return ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial_restore,
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings` (the restore target)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
