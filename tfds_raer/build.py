"""`tfds build` with this project's builders registered, also where the `tfds` CLI cannot start.

  python -m tfds_raer.build tfds_raer/raer --manual_dir=/data/RAER --data_dir=D --config=64px \\
      [--skip_bad_clips] [--validation_fraction=0.1] [--validation_seed=0] [--max_frames=64] \\
      [--jpeg_quality=90] [--path_prefix_map=/authors/prefix/=/data/RAER/] [--num_workers=0]

All other flags are those of `tfds build` (same code: tensorflow_datasets.scripts.cli.build).
The raer options above are passed to the builder through the TFDS_RAER_OPTIONS environment
variable, which also works with the stock `tfds build`. The `tfds` command of TFDS 4.9.10
imports Apache Beam and mlcroissant at start-up (for other commands) and fails without them;
building RAER needs neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def parse_raer_flags(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Splits the raer builder options off `argv`; returns (options, remaining argv)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--skip_bad_clips", action="store_true", default=None)
    p.add_argument("--validation_fraction", type=float)
    p.add_argument("--validation_seed", type=int)
    p.add_argument("--max_frames", type=int)
    p.add_argument("--jpeg_quality", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--path_prefix_map", action="append", metavar="OLD=NEW")
    for name in ("train_file", "test_file", "face_boxes_file", "body_boxes_file"):
        p.add_argument(f"--{name}")
    known, rest = p.parse_known_args(list(argv))
    options = {k: v for k, v in vars(known).items() if v is not None}
    if "path_prefix_map" in options:
        pairs = []
        for item in options["path_prefix_map"]:
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise SystemExit(f"--path_prefix_map expects OLD=NEW, got {item!r}")
            pairs.append([old, new])
        options["path_prefix_map"] = pairs
    return options, rest


def main(argv: Sequence[str] | None = None) -> None:
    from absl import logging
    from tensorflow_datasets.scripts.cli import build, cli_utils

    import tfds_raer  # noqa: F401  (registers "raer" for name lookups)
    from tfds_raer.raer import raer_lib

    options, rest = parse_raer_flags(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    parse = cli_utils.make_flags_parser(build.Args, description="tfds build (tfds_raer)")
    args = parse(["tfds_raer.build", *rest])
    logging.set_verbosity(logging.INFO)
    previous = os.environ.get(raer_lib.OPTIONS_ENV)
    if options:
        os.environ[raer_lib.OPTIONS_ENV] = json.dumps({**raer_lib.env_options(), **options})
    try:
        args.execute()
    finally:
        if previous is None:
            os.environ.pop(raer_lib.OPTIONS_ENV, None)
        else:
            os.environ[raer_lib.OPTIONS_ENV] = previous


if __name__ == "__main__":
    main()
