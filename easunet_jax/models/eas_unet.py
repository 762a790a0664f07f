"""EAS U-Net: a U-Net of depthwise-separable blocks, an EAS module at the bottleneck, fused side outputs."""

import jax
import jax.numpy as jnp
from flax import nnx

from easunet_jax.models import heads, layers
from easunet_jax.models.eas import EAS


class EncoderStage(nnx.Module):
  """[2x2 max-pool], DS(c_in -> c_out), DS(c_out -> c_out)."""

  def __init__(self, c_in: int, c_out: int, *, pool: bool, impl: str, dtype, rngs: nnx.Rngs):
    self.pool = pool
    self.block1 = layers.SeparableBlock(c_in, c_out, impl=impl, dtype=dtype, rngs=rngs)
    self.block2 = layers.SeparableBlock(c_out, c_out, impl=impl, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool:
      x = layers.max_pool_2x2(x)
    return self.block2(self.block1(x))


class DecoderStage(nnx.Module):
  """2x2 transposed conv c_in -> c_out, concat [up, skip], DS(2 c_out -> c_out), DS(c_out -> c_out)."""

  def __init__(self, c_in: int, c_out: int, *, impl: str, dtype, rngs: nnx.Rngs):
    self.up = layers.UpConv(c_in, c_out, dtype=dtype, rngs=rngs)
    self.block1 = layers.SeparableBlock(2 * c_out, c_out, impl=impl, dtype=dtype, rngs=rngs)
    self.block2 = layers.SeparableBlock(c_out, c_out, impl=impl, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    return self.block2(self.block1(jnp.concatenate([self.up(x), skip], axis=-1)))


class Stem(nnx.Module):
  """3x3 convolution 1 -> features[0], BN, LeakyReLU (a depthwise conv on one channel is degenerate)."""

  def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding='SAME', use_bias=False, dtype=dtype,
                         rngs=rngs)
    self.bn = layers.batch_norm(c_out, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.leaky_relu(self.bn(self.conv(x)))


class EASUNet(nnx.Module):
  """Input (B, H, W, C_in), H and W multiples of 16.

  Training mode (`model.train()`) returns (final, [side_d1, ..., side_d4]), all (B, H, W, K) logits;
  evaluation mode (`model.eval()`) returns the final logits alone.
  """

  def __init__(self, *, features: tuple[int, ...] = (32, 64, 128, 256, 512), num_classes: int = 3,
               in_channels: int = 1, aspp_rates: tuple[int, ...] = (6, 12, 18),
               depthwise_impl: str = 'auto', dtype=jnp.float32, rngs: nnx.Rngs):
    f = tuple(features)
    kw = dict(impl=depthwise_impl, dtype=dtype, rngs=rngs)
    self.num_levels = len(f)
    self.stem = Stem(in_channels, f[0], dtype=dtype, rngs=rngs)
    self.encoder = nnx.List(
        [EncoderStage(f[max(s - 1, 0)], f[s], pool=s > 0, **kw) for s in range(len(f))])
    self.eas = EAS(f[-1], tuple(aspp_rates), **kw)
    # decoder[0] is d1 (full resolution), decoder[-1] the deepest (d4 at the default five levels).
    self.decoder = nnx.List([DecoderStage(f[s + 1], f[s], **kw) for s in range(len(f) - 1)])
    self.output_fusion = heads.OutputFusion(f[:-1], num_classes, dtype=dtype, rngs=rngs)
    self.dtype = dtype
    self.deterministic = False  # set by model.train() / model.eval()

  def __call__(self, x_BHWC: jax.Array):
    stride = 2 ** (self.num_levels - 1)
    if x_BHWC.ndim != 4 or x_BHWC.shape[1] % stride or x_BHWC.shape[2] % stride:
      raise ValueError(f'EASUNet expects (B, H, W, C) with H, W multiples of {stride}, '
                       f'got {x_BHWC.shape}')
    skips = []
    x = self.stem(x_BHWC.astype(self.dtype))
    for stage in self.encoder:
      x = stage(x)
      skips.append(x)
    x = self.eas(skips.pop())  # EAS replaces e5 on the path
    decoded = []
    for stage, skip in zip(reversed(self.decoder), reversed(skips)):
      x = stage(x, skip)
      decoded.append(x)
    final, sides = self.output_fusion(decoded[::-1])
    final, sides = final.astype(jnp.float32), [s.astype(jnp.float32) for s in sides]
    return final if self.deterministic else (final, sides)
