"""EAS U-Net: a U-Net of depthwise-separable blocks, an EAS module at the bottleneck, fused side outputs.

The ablation switches (config `model.block`, `eca`, `eas`, `deep_supervision`, `fusion`) each take one of
these parts out or swap it for the plain alternative; their defaults build the paper's network.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import heads, layers
from easunet_jax.models.eas import EAS
from easunet_jax.models.unet import ConvBnAct, Output, check_input, network_output, stride


def _block_factory(block: str, impl: str):
  """The encoder/decoder block, called (c_in, c_out, dtype=, rngs=): 'separable' is the DS block;
  'standard' a full 3x3 convolution, BN, h-swish (the DS block's output activation)."""
  return {'separable': functools.partial(layers.SeparableBlock, impl=impl),
          'standard': functools.partial(ConvBnAct, act=jax.nn.hard_swish)}[block]


class EncoderStage(nnx.Module):
  """[2x2 max-pool], block(c_in -> c_out), block(c_out -> c_out)."""

  def __init__(self, c_in: int, c_out: int, *, pool: bool, block: Callable[..., nnx.Module], dtype: DTypeLike,
               rngs: nnx.Rngs):
    self.pool = pool
    self.block1 = block(c_in, c_out, dtype=dtype, rngs=rngs)
    self.block2 = block(c_out, c_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool:
      x = layers.max_pool_2x2(x)
    return self.block2(self.block1(x))


class DecoderStage(nnx.Module):
  """2x2 transposed conv c_in -> c_out, concat [up, skip], block(2 c_out -> c_out), block(c_out -> c_out)."""

  def __init__(self, c_in: int, c_out: int, *, block: Callable[..., nnx.Module], dtype: DTypeLike,
               rngs: nnx.Rngs):
    self.up = layers.UpConv(c_in, c_out, dtype=dtype, rngs=rngs)
    self.block1 = block(2 * c_out, c_out, dtype=dtype, rngs=rngs)
    self.block2 = block(c_out, c_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    return self.block2(self.block1(jnp.concatenate([self.up(x), skip], axis=-1)))


class EASUNet(nnx.Module):
  """Input (B, H, W, C_in), H and W multiples of `stride(features)` (16 for the default widths).

  Training mode (`model.train()`) returns (final, [side_d1, ..., side_d4]), all (B, H, W, K) logits
  (no sides without deep supervision); evaluation mode (`model.eval()`) returns the final logits alone.
  """

  def __init__(self, *, features: tuple[int, ...] = (32, 64, 128, 256, 512), num_classes: int = 3,
               aspp_rates: tuple[int, ...] = (6, 12, 18),
               depthwise_impl: str = 'auto', block: str = 'separable', eca: bool = True, eas: bool = True,
               deep_supervision: bool = True, fusion: str = 'concat', dtype: DTypeLike = jnp.float32,
               rngs: nnx.Rngs):
    f = tuple(features)
    make_block = _block_factory(block, depthwise_impl)
    self.stride = stride(f)
    # A depthwise convolution of the one input channel (the scan) is degenerate: the stem is a full 3x3
    # convolution.
    self.stem = ConvBnAct(1, f[0], act=layers.leaky_relu, dtype=dtype, rngs=rngs)
    self.encoder = nnx.List([EncoderStage(f[max(s - 1, 0)], f[s], pool=s > 0, block=make_block, dtype=dtype,
                                          rngs=rngs) for s in range(len(f))])
    self.eas = EAS(f[-1], tuple(aspp_rates), eca=eca, impl=depthwise_impl, dtype=dtype,
                   rngs=rngs) if eas else None
    # decoder[0] is d1 (full resolution), decoder[-1] the deepest (d4 at the default five levels).
    self.decoder = nnx.List([DecoderStage(f[s + 1], f[s], block=make_block, dtype=dtype, rngs=rngs)
                             for s in range(len(f) - 1)])
    self.deep_supervision = deep_supervision
    if deep_supervision:
      self.output_fusion = heads.OutputFusion(f[:-1], num_classes, fusion=fusion, dtype=dtype, rngs=rngs)
    else:
      self.head = layers.pointwise(f[0], num_classes, dtype, rngs, use_bias=True)
    self.dtype = dtype
    self.deterministic = False  # set by model.train() / model.eval()

  def __call__(self, x_BHWC: jax.Array) -> Output:
    check_input(x_BHWC, self.stride, 'EASUNet')
    skips = []
    x = self.stem(x_BHWC.astype(self.dtype))
    for stage in self.encoder:
      x = stage(x)
      skips.append(x)
    x = skips.pop()
    if self.eas is not None:
      x = self.eas(x)  # EAS replaces e5 on the path
    decoded = []
    for stage, skip in zip(reversed(self.decoder), reversed(skips)):
      x = stage(x, skip)
      decoded.append(x)
    if self.deep_supervision:
      final, sides = self.output_fusion(decoded[::-1])
    else:
      final, sides = self.head(x), []
    return network_output(final, sides, self.deterministic)
