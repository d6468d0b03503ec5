"""TFDS builders of this project. `import tfds_raer` registers the "raer" dataset."""

from tfds_raer import raer  # noqa: F401  (registers the builder)
