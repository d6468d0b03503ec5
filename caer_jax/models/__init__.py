"""Models: Flax CLIP, weight importers and CLIP-CAER."""
