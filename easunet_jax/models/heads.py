"""Multi-scale output fusion (deep supervision): side logits from each decoder stage, fused by concat."""

import jax
import jax.numpy as jnp
from flax import nnx

from easunet_jax.models import layers


class OutputFusion(nnx.Module):
  """A 1x1 head on each of d1..d4, bilinear up-sampling to H x W, concat, 1x1 fusion to the final logits."""

  def __init__(self, stage_channels: tuple[int, ...], num_classes: int, *, dtype, rngs: nnx.Rngs):
    self.heads = nnx.List([layers.pointwise(c, num_classes, dtype, rngs, use_bias=True)
                           for c in stage_channels])
    self.fusion = layers.pointwise(len(stage_channels) * num_classes, num_classes, dtype, rngs,
                                   use_bias=True)

  def __call__(self, decoder_maps: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """decoder_maps: d1..d4 (d1 at full resolution). Returns (final, [side_d1..side_d4])."""
    b, h, w, _ = decoder_maps[0].shape
    sides = []
    for head, d in zip(self.heads, decoder_maps):
      side = head(d)
      if side.shape[1:3] != (h, w):
        # Half-pixel centres: PyTorch's bilinear interpolate with align_corners=False.
        side = jax.image.resize(side, (b, h, w, side.shape[-1]), 'bilinear')
      sides.append(side)
    return self.fusion(jnp.concatenate(sides, axis=-1)), sides
