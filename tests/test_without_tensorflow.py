"""Training reads the built dataset without TensorFlow (only building needs it).

Accelerator hosts often have no TensorFlow; with tfds.features.Video in the builder's features,
merely constructing the dataset's features imported it, so no reader could start there.
"""

import subprocess
import sys
import textwrap

import tensorflow_datasets as tfds

import tfds_raer  # noqa: F401  (registers "raer")
from caer_jax.data import synthetic

# Runs in a fresh interpreter where importing tensorflow fails as if it were not installed.
_READ_WITHOUT_TF = textwrap.dedent(
    """
    import sys

    class WithoutTensorFlow:  # finds no tensorflow, as where it is not installed

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)

    sys.meta_path[:] = [WithoutTensorFlow(f) for f in sys.meta_path]
    from caer_jax.data import pipeline, prepare
    from configs import synthetic_tiny

    c = synthetic_tiny.get_config("scratch")
    c.data.data_dir = sys.argv[1]
    c.data.synthetic.enabled = False
    c.data.num_segments = 4
    c.train.batch_size = 2
    prepare.prepare_data(c)  # finds the build
    batch = next(pipeline.train_iterator(c, seed=0, process_index=0, process_count=1))
    assert "tensorflow" not in sys.modules
    print(batch["face"].shape, batch["face"].dtype, batch["context"].shape)
    """
)


def test_the_pipeline_reads_a_build_without_tensorflow(tmp_path):
    raw, data_dir = tmp_path / "raer", tmp_path / "tfds"
    synthetic.generate(raw, num_clips=10, seed=0, min_frames=4, max_frames=6, workers=0)
    builder = tfds.builder("raer/64px", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))

    run = subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_TF, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "(2, 4, 64, 64, 3) uint8 (2, 4, 64, 64, 3)"
