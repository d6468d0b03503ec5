"""Makes sure the TFDS dataset a config reads exists; for the embedded default, creates it.

With `config.data.synthetic.enabled`, synthetic RAER-layout clips are generated into
`synthetic.manual_dir` (unless already there) and packed by the same TFDS builder that packs the
real RAER release, with the classes of config.model.label_set. Only process 0 writes; the others
wait at a barrier. A dataset built by an older builder version lives in another version folder,
so it is rebuilt (from the same synthetic clips). Whatever built it, the dataset's classes must
be the label set's.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import logging

import tfds_raer  # noqa: F401  (registers the "raer" builder)
from caer_jax import distributed, errors, label_sets
from caer_jax.data import synthetic
from tfds_raer.raer import frame_records


def _dataset_exists(config: ml_collections.ConfigDict) -> bool:
    builder = tfds.builder(config.data.tfds_name, data_dir=config.data.data_dir or None)
    if not builder.is_prepared():
        return False
    if config.data.synthetic.enabled:
        tables = builder.info.metadata.get(frame_records.METADATA_KEY, {})
        built = sum(len(table["video_id"]) for table in tables.values())
        _check_clip_count(built, config, f"{builder.data_dir}")
    return True


def _check_clip_count(found: int, config: ml_collections.ConfigDict, where: str) -> None:
    # A folder left by a run with another num_clips would otherwise be reused silently.
    wanted = config.data.synthetic.num_clips
    if found != wanted:
        raise errors.BadInputError(
            f"{where} holds {found} synthetic clips but config.data.synthetic.num_clips is "
            f"{wanted}: delete it, or point config.data.synthetic.manual_dir and "
            f"config.data.data_dir elsewhere"
        )


def _check_classes(config: ml_collections.ConfigDict) -> None:
    builder = tfds.builder(config.data.tfds_name, data_dir=config.data.data_dir or None)
    label_set = label_sets.load(config.model.label_set)
    label_sets.check_same_classes(
        label_set.class_names,
        f"config.model.label_set={config.model.label_set!r}",
        builder.info.features["label"].names,
        f"the dataset {config.data.tfds_name} in {builder.data_dir}",
    )


def not_built_error(config: ml_collections.ConfigDict) -> errors.MissingInputError:
    """The error for a config whose TFDS dataset is not built, with the command that builds it."""
    builder = tfds.builder(config.data.tfds_name, data_dir=config.data.data_dir or None)
    others = sorted(
        p.name
        for p in Path(builder.data_dir).parent.glob("*.*.*")
        if p.name != str(builder.version) and p.name.replace(".", "").isdigit()
    )
    older = (
        f" (only version {', '.join(others)} is there, written by another builder version: "
        f"its records differ, see the release notes in tfds_raer/raer)"
        if others
        else ""
    )
    return errors.MissingInputError(
        f"TFDS dataset {config.data.tfds_name!r} version {builder.version} is not built in "
        f"{errors.named_path(config.data.data_dir or builder.data_dir_root)}{older}; build it first: "
        f"tfds build tfds_raer/raer --manual_dir=/path/to/RAER "
        f"--config={config.data.tfds_name.split('/')[-1]} --data_dir={config.data.data_dir or '...'}"
    )


def check_split(config: ml_collections.ConfigDict, split: str) -> None:
    """Raises a UserError when the dataset is not built or has no split `split` (which may be a
    TFDS split expression such as "train[:10%]+test")."""
    builder = tfds.builder(config.data.tfds_name, data_dir=config.data.data_dir or None)
    if not builder.is_prepared():
        raise not_built_error(config)
    known = list(builder.info.splits)
    for part in split.split("+"):
        name = part.split("[", 1)[0].strip()
        if name not in known:
            raise errors.BadInputError(
                f"split {name!r} does not exist in {config.data.tfds_name} ({builder.data_dir}); "
                f"its splits: {', '.join(known)} (choose with --split, or config.data.*_split)"
            )


def prepare_data(config: ml_collections.ConfigDict) -> None:
    """Generates and builds the synthetic dataset when the config asks for it and it is missing;
    checks that the dataset has the classes of config.model.label_set."""
    if not _dataset_exists(config):
        _build(config)
    _check_classes(config)


def _build(config: ml_collections.ConfigDict) -> None:
    if not config.data.synthetic.enabled:
        raise not_built_error(config)
    if jax.process_index() == 0:
        manual_dir = Path(config.data.synthetic.manual_dir)
        if not (manual_dir / "train.txt").exists():
            logging.info(
                "generating %d synthetic clips in %s", config.data.synthetic.num_clips, manual_dir
            )
            synthetic.generate(
                manual_dir,
                num_clips=config.data.synthetic.num_clips,
                seed=config.data.synthetic.seed,
                num_classes=label_sets.load(config.model.label_set).num_classes,
            )
        logging.info("building %s from %s", config.data.tfds_name, manual_dir)
        builder = tfds.builder(
            config.data.tfds_name,
            data_dir=config.data.data_dir or None,
            label_set=config.model.label_set,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
    distributed.barrier("prepare_data")
