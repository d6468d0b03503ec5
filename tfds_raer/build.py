"""`tfds build` with this project's builders registered, also where the `tfds` CLI cannot start.

  python -m tfds_raer.build tfds_raer/raer --manual_dir=/data/RAER --data_dir=D --config=64px

Same flags and code as `tfds build` (tensorflow_datasets.scripts.cli.build). The `tfds` command of
TFDS 4.9.10 imports Apache Beam at start-up for its `convert_format` command and fails with
"No module named 'apache_beam'" when Beam is not installed; building RAER needs no Beam.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from absl import logging
    from tensorflow_datasets.scripts.cli import build, cli_utils

    import tfds_raer  # noqa: F401  (registers "raer" for `--imports`-free name lookups)

    argv = list(sys.argv[1:] if argv is None else argv)
    parse = cli_utils.make_flags_parser(build.Args, description="tfds build (tfds_raer)")
    args = parse(["tfds_raer.build", *argv])
    logging.set_verbosity(logging.INFO)
    args.execute()


if __name__ == "__main__":
    main()
