"""CLIP-CAER in JAX/Flax: context-aware academic emotion recognition on RAER."""

__version__ = "0.1.0"
