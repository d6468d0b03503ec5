"""Build throughput of the RAER builder.

  python -m tfds_raer.raer.benchmark --manual_dir=data/synthetic_raer --config=64px --workers=1,2

or `build_rate(manual_dir, config="64px", num_workers=2)` from a benchmark script. Every run
builds into a fresh temporary data_dir (removed afterwards unless `data_dir` is given). What each
storage encoding costs and loses, read through the input pipeline, is caer_jax's benchmark:
`python -m caer_jax.bench --storage` (caer_jax/bench_storage.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

import tfds_raer  # noqa: F401  (registers "raer")
from caer_jax import errors
from tfds_raer.raer import raer_lib


def _source_bytes(manual_dir: Path) -> tuple[int, int]:
    frames = size = 0
    for split_file in raer_lib.ANNOTATION_FILES.values():
        for line in (manual_dir / split_file).read_text().splitlines():
            if not line.strip():
                continue
            folder = Path(line.split(" ")[0])
            folder = folder if folder.is_absolute() else manual_dir / folder
            for p in folder.iterdir():
                if p.name.lower().endswith(raer_lib.IMAGE_SUFFIXES):
                    frames += 1
                    size += p.stat().st_size
    return frames, size


def build_rate(
    manual_dir: str | Path,
    *,
    config: str = "64px",
    num_workers: int = 0,
    data_dir: str | Path | None = None,
    file_format: str | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Builds raer/<config> from `manual_dir` once and returns (and prints) the rates.

    clips/s and frames/s count clips and frames written; "read MB/s" is source frame bytes
    read per second, "write MB/s" stored JPEG crop bytes (face + context) per second. The time
    is the whole download_and_prepare (parsing, checks, decoding, cropping, encoding, writing).
    """
    manual = Path(manual_dir)
    frames, src_bytes = _source_bytes(manual)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="raer_bench_")
        data_dir = tmp
    try:
        builder = tfds.builder(
            f"raer/{config}",
            data_dir=str(data_dir),
            file_format=file_format,
            num_workers=num_workers,
            **options,
        )
        start = time.perf_counter()
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
        seconds = time.perf_counter() - start
        stats = builder.info.metadata["statistics"]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    clips = sum(s["num_clips"] for s in stats.values())
    stored = sum(s["bytes_stored"] for s in stats.values())
    result = {
        "config": config,
        "num_workers": num_workers,
        "clips": clips,
        "frames": frames,
        "seconds": round(seconds, 2),
        "clips_per_s": round(clips / seconds, 1),
        "frames_per_s": round(frames / seconds, 1),
        "read_MB_per_s": round(src_bytes / 1e6 / seconds, 2),
        "write_MB_per_s": round(stored / 1e6 / seconds, 2),
    }
    if not quiet:
        print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line; a bad argument prints one `error:` line and exits with status 2."""
    with errors.reported():
        return _main(argv)


def _main(argv: list[str] | None) -> list[dict[str, Any]]:
    p = errors.ArgumentParser(prog="python -m tfds_raer.raer.benchmark", description=__doc__)
    p.add_argument("--manual_dir", help="build rate of this manual_dir")
    p.add_argument("--config", default="64px")
    p.add_argument("--workers", default="0", help="comma-separated thread counts (0 = per core)")
    p.add_argument("--file_format", default=None)
    p.add_argument("--max_frames", type=int, default=0)
    args = p.parse_args(argv)
    if not args.manual_dir:
        p.error("--manual_dir is required")
    return [
        build_rate(
            args.manual_dir,
            config=args.config,
            num_workers=int(w),
            file_format=args.file_format,
            max_frames=args.max_frames,
        )
        for w in args.workers.split(",")
    ]


if __name__ == "__main__":
    main()
