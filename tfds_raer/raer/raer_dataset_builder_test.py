"""TFDS's standard builder test on the hand-made dummy_data/ (6 clips of 40x30 frames)."""

import importlib.util
import sys
import types

# tfds.testing imports `dill` (for its feature tests only; TFDS's "tests-all" extra). Without it
# the builder test would not even load, so stand in an empty module when it is missing.
if importlib.util.find_spec("dill") is None:
    sys.modules["dill"] = types.ModuleType("dill")

import tensorflow_datasets as tfds  # noqa: E402

from tfds_raer.raer import raer_dataset_builder  # noqa: E402


class RaerDatasetBuilderTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = raer_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["64px", "224px"]
    SPLITS = {"train": 4, "test": 2}
    SKIP_CHECKSUMS = True  # manual download: nothing is fetched

    def _make_builder(self, config=None):
        # as_dataset() (what this test reads back) cannot read ArrayRecord, the builder's
        # default; tests/test_builder.py reads ArrayRecord through tfds.data_source.
        return self.dataset_class(
            data_dir=self.tmp_dir, config=config, version=self.VERSION, file_format="tfrecord"
        )


if __name__ == "__main__":
    tfds.testing.test_main()
