"""CLIP-CAER in JAX/Flax: context-aware academic emotion recognition on RAER."""
