"""Lists every damaged record of a build and its feature caches, before a long run needs them:
`python -m caer_jax.data.check --config=... [--split=train,test]`.

Every frame record of the splits (all of the build's by default) is read, checked against the
clip table and both its crops decoded, as training reads them; every record of the complete
feature caches of those splits (config.data.feature_cache.dir, or each encoder's cache in the
dataset's `feature_cache` folder) is read. A shard that is missing or cannot be opened is one
entry, naming the records and clips it holds. Exit status 0 when nothing is damaged; otherwise
one line per damaged record and the `error:` line, status 2.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import tensorflow_datasets as tfds
from absl import flags
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath
from tqdm import tqdm

from caer_jax import cli, errors
from caer_jax.data import clips, feature_cache, prepare


def scan_split(frames: clips.SplitFrames) -> list[errors.DamagedDataError]:
    """The damage of one split's records, in record order."""
    found = []
    bar = tqdm(total=frames.table.total_frames, desc=f"check {frames.where}", unit="frame")
    for path, first, count in frames.shards():
        try:
            if not epath.Path(path).exists():
                raise FileNotFoundError("missing")
            ArrayRecordReader(path).close()  # reads the footer: a file cut short fails here
        except clips.READ_ERRORS as e:
            found.append(frames.lost_file(path, first, count, f"cannot be opened ({e})"))
            bar.update(count)
            continue
        for index in range(first, first + count):
            position, frame = frames.table.locate(index)
            try:
                frames.clip(position).images([frame])
            except errors.DamagedDataError as e:
                found.append(e)
            bar.update(1)
    bar.close()
    return found


def cache_dirs(config: ml_collections.ConfigDict, split: str, data_dir: str) -> list[Path]:
    """The complete feature caches of `split`: the config's folder, or every encoder's."""
    root = config.data.feature_cache.dir
    found = (
        [Path(root) / split] if root else sorted(Path(data_dir).glob(f"feature_cache/*/{split}"))
    )
    return [d for d in found if (d / feature_cache.INFO_FILE).exists()]


def scan_cache(directory: Path) -> list[errors.DamagedDataError]:
    """The damage of one split's feature cache."""
    try:
        source = feature_cache.FeatureSource(directory, expected_key=None)
    except errors.DamagedDataError as e:
        return [e]
    found = []
    for index in tqdm(range(len(source)), desc=f"check {directory}", unit="clip"):
        try:
            source[index]
        except errors.DamagedDataError as e:
            found.append(e)
    return found


def check(config: ml_collections.ConfigDict, splits: list[str]) -> str:
    """Scans `splits` (all of the build's when empty) and their feature caches; returns a summary
    when nothing is damaged, else prints every damaged record and raises DamagedDataError."""
    name, data_dir = config.data.tfds_name, config.data.data_dir or None
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise prepare.not_built_error(config)  # else an empty folder would pass as clean
    splits = splits or list(builder.info.splits)
    for split in splits:
        prepare.check_split(config, split)
    found, records, caches = [], 0, 0
    for split in splits:
        frames = clips.open_split(name, split, data_dir)
        records += frames.table.total_frames
        found += scan_split(frames)
        for directory in cache_dirs(config, split, frames.directory):
            caches += 1
            found += scan_cache(directory)
    what = f"{name} ({', '.join(splits)}) in {builder.data_dir}"
    if not found:
        return f"no damaged records: {records} frame records of {what}, {caches} feature caches"
    for e in found:
        print(f"damaged: {e.what}", flush=True)
    remedies = sorted({e.args[1] for e in found})
    raise errors.DamagedDataError(
        f"{len(found)} damaged records or files in {what} and its feature caches (listed above)",
        "; ".join(remedies),
    )


def define_flags() -> dict[str, flags.FlagHolder]:
    return {
        "config": cli.define_config_flag(),
        "split": flags.DEFINE_list(
            "split", [], "Splits to check, comma-separated (default: every split of the build)."
        ),
    }


def run(argv: list[str], flag: cli.Flags) -> None:
    cli.start(argv, config=flag.config.value)
    print(check(flag.config.value, flag.split.value))


def main() -> None:
    cli.main(run, define_flags)


if __name__ == "__main__":
    main()
