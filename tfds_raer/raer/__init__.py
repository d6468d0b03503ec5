"""The RAER dataset builder ("raer/224px", "raer/64px")."""

from tfds_raer.raer.raer_dataset_builder import Builder, RaerConfig  # noqa: F401
