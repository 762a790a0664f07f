"""Multi-scale output fusion (deep supervision): side logits from each decoder stage, fused by concat
(the paper's) or, as an ablation, by addition."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import layers


class OutputFusion(nnx.Module):
  """A 1x1 head on each of d1..d4, bilinear up-sampling to H x W, then the final logits:
  fusion 'concat', concat and a 1x1 convolution 4K -> K; fusion 'add', the sum of the side logits."""

  def __init__(self, stage_channels: tuple[int, ...], num_classes: int, *, fusion: str = 'concat',
               dtype: DTypeLike, rngs: nnx.Rngs):
    self.heads = nnx.List([layers.pointwise(c, num_classes, dtype, rngs, use_bias=True)
                           for c in stage_channels])
    self.fusion = layers.pointwise(len(stage_channels) * num_classes, num_classes, dtype, rngs,
                                   use_bias=True) if fusion == 'concat' else None

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
    if self.fusion is None:
      return sum(sides), sides
    return self.fusion(jnp.concatenate(sides, axis=-1)), sides
