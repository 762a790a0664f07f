"""The EAS module: atrous spatial pyramid pooling whose 1x1 branch ends in ECA channel attention."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import layers


class AtrousSeparable(nnx.Module):
  """Atrous separable branch (DeepLabv3+): depthwise 3x3 at a dilation, BN, h-swish, 1x1, BN, h-swish."""

  def __init__(self, channels: int, rate: int, *, impl: str, dtype: DTypeLike, rngs: nnx.Rngs):
    self.depthwise = layers.DepthwiseConv(channels, dilation=rate, impl=impl, dtype=dtype, rngs=rngs)
    self.bn1 = layers.batch_norm(channels, dtype, rngs)
    self.pointwise = layers.pointwise(channels, channels, dtype, rngs)
    self.bn2 = layers.batch_norm(channels, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.hard_swish(self.bn1(self.depthwise(x)))
    return jax.nn.hard_swish(self.bn2(self.pointwise(x)))


class ConvBnHswish(nnx.Module):
  """1x1 convolution, BN, h-swish."""

  def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.conv = layers.pointwise(c_in, c_out, dtype, rngs)
    self.bn = layers.batch_norm(c_out, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.hard_swish(self.bn(self.conv(x)))


class EAS(nnx.Module):
  """ECA-ASPP: [1x1 + ECA, atrous separable at each rate, image pooling] -> concat -> 1x1 projection.

  Without `eca` the 1x1 branch ends at its h-swish, as in plain ASPP.
  """

  def __init__(self, channels: int, rates: tuple[int, ...], *, eca: bool = True, impl: str, dtype: DTypeLike,
               rngs: nnx.Rngs):
    self.b0 = ConvBnHswish(channels, channels, dtype=dtype, rngs=rngs)
    self.eca = layers.ECA(channels, dtype=dtype, rngs=rngs) if eca else None
    self.atrous = nnx.List(
        [AtrousSeparable(channels, r, impl=impl, dtype=dtype, rngs=rngs) for r in rates])
    # Its BN sees one value per sample and channel: training needs a global batch >= 2.
    self.image_pool = ConvBnHswish(channels, channels, dtype=dtype, rngs=rngs)
    self.project = ConvBnHswish((len(rates) + 2) * channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    pooled = self.image_pool(jnp.mean(x_BHWC, axis=(1, 2), keepdims=True))
    b0 = self.b0(x_BHWC)
    branches = ([b0 if self.eca is None else self.eca(b0)] + [branch(x_BHWC) for branch in self.atrous]
                + [jnp.broadcast_to(pooled, x_BHWC.shape[:3] + pooled.shape[3:])])
    return self.project(jnp.concatenate(branches, axis=-1))
