"""TFDS's standard builder test on the hand-made dummy_data/ (6 clips of 40x30 frames)."""

import tensorflow_datasets as tfds

from tfds_raer.raer import raer_dataset_builder


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
