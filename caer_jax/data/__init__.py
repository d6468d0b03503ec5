"""Data: the synthetic RAER-layout generator, clip sampling and the grain input pipeline."""
