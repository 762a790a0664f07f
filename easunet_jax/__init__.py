"""EAS U-Net knee cartilage segmentation in JAX."""
