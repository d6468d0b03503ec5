"""TFDS's standard builder test on the hand-made dummy_data/ (6 clips of 40x30 frames)."""

from pathlib import Path

import tensorflow_datasets as tfds

from tfds_raer.raer import raer_dataset_builder


class RaerDatasetBuilderTest(tfds.testing.DatasetBuilderTestCase):
    DATASET_CLASS = raer_dataset_builder.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["64px", "224px"]
    # One record per frame: train.txt lists 4 clips of 3 + 2 + 2 + 3 frames, test.txt 2 of 2 + 3.
    SPLITS = {"train": 10, "test": 5}
    SKIP_CHECKSUMS = True  # manual download: nothing is fetched

    def _make_builder(self, config=None):
        # as_dataset() (what this test reads back) cannot read ArrayRecord, the builder's
        # default; tests/test_builder.py reads ArrayRecord through tfds.data_source.
        return self.dataset_class(
            data_dir=self.tmp_dir, config=config, version=self.VERSION, file_format="tfrecord"
        )


def test_splits_count_the_frames_of_dummy_data():
    """SPLITS above, from dummy_data/ itself: the frames of the clips each annotation file lists."""
    dummy = Path(raer_dataset_builder.Builder.code_path).parent / "dummy_data"
    for split, want in RaerDatasetBuilderTest.SPLITS.items():
        lines = (dummy / f"{split}.txt").read_text().splitlines()
        frames = [len(list((dummy / line.split(" ")[0]).iterdir())) for line in lines]
        assert [int(line.split(" ")[1]) for line in lines] == frames
        assert sum(frames) == want


if __name__ == "__main__":
    tfds.testing.test_main()
