"""Data: NIfTI volumes, the built-in phantom, the slice store and the Grain input pipeline."""
