"""U-Net (Ronneberger 2015, with BatchNorm), and the 3x3 conv blocks and helpers the other networks share."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import layers


class ConvBnAct(nnx.Module):
  """3x3 convolution (no bias, BN follows), BN, activation."""

  def __init__(self, c_in: int, c_out: int, *, act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               dtype: DTypeLike, rngs: nnx.Rngs):
    self.conv = nnx.Conv(c_in, c_out, kernel_size=(3, 3), padding='SAME', use_bias=False, dtype=dtype,
                         rngs=rngs)
    self.bn = layers.batch_norm(c_out, dtype, rngs)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.bn(self.conv(x)))


class DoubleConv(nnx.Module):
  """The baselines' block: (3x3 conv, BN, ReLU) twice, c_in -> c_out -> c_out."""

  def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.conv1 = ConvBnAct(c_in, c_out, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBnAct(c_out, c_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv2(self.conv1(x))


class Encoder(nnx.Module):
  """Stage s: [2x2 max-pool for s > 0], DoubleConv(C_{s-1} -> C_s). Returns every stage's output e1..e5."""

  def __init__(self, in_channels: int, features: tuple[int, ...], *, dtype: DTypeLike, rngs: nnx.Rngs):
    widths = (in_channels,) + tuple(features)
    self.stages = nnx.List([DoubleConv(widths[s], widths[s + 1], dtype=dtype, rngs=rngs)
                            for s in range(len(features))])

  def __call__(self, x_BHWC: jax.Array) -> list[jax.Array]:
    outputs = []
    for s, stage in enumerate(self.stages):
      x_BHWC = stage(layers.max_pool_2x2(x_BHWC) if s else x_BHWC)
      outputs.append(x_BHWC)
    return outputs


class UpStage(nnx.Module):
  """2x2 transposed conv C_in -> C_out (with bias), concat [up, *skips], DoubleConv(.. -> C_out).

  U-Net passes one skip; U-Net++'s nested nodes pass all earlier nodes of their level.
  """

  def __init__(self, c_in: int, c_out: int, num_skips: int = 1, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.up = layers.UpConv(c_in, c_out, dtype=dtype, rngs=rngs)
    self.block = DoubleConv((num_skips + 1) * c_out, c_out, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *skips: jax.Array) -> jax.Array:
    return self.block(jnp.concatenate([self.up(x), *skips], axis=-1))


def stride(features: Sequence[int]) -> int:
  """The total down-sampling of every network here with these encoder widths: a 2x2 pooling between
  stages. Slices must be multiples of it in height and width."""
  return 2 ** (len(features) - 1)


def check_input(x_BHWC: jax.Array, multiple: int, name: str) -> None:
  """ValueError unless x is (B, H, W, C) with H, W multiples of the network's `stride`."""
  if x_BHWC.ndim != 4 or x_BHWC.shape[1] % multiple or x_BHWC.shape[2] % multiple:
    raise ValueError(f'{name} expects (B, H, W, C) with H, W multiples of {multiple}, got {x_BHWC.shape}')


# What a network returns: the final logits in evaluation mode, (final, side outputs) in training mode.
Output = jax.Array | tuple[jax.Array, list[jax.Array]]


def network_output(final_BHWK: jax.Array, sides: list[jax.Array], deterministic: bool) -> Output:
  """Float32 logits: `final` in evaluation mode, (final, sides) in training mode (the loss's input)."""
  final_BHWK = final_BHWK.astype(jnp.float32)
  return final_BHWK if deterministic else (final_BHWK, [s.astype(jnp.float32) for s in sides])


class UNet(nnx.Module):
  """Input (B, H, W, C_in), H and W multiples of `stride(features)` (16 for the default widths).

  Training mode returns (final, []) (no side outputs), evaluation mode the final (B, H, W, K) logits.
  """

  def __init__(self, *, features: tuple[int, ...] = (32, 64, 128, 256, 512), num_classes: int = 3,
               dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
    f = tuple(features)
    self.stride = stride(f)
    self.encoder = Encoder(1, f, dtype=dtype, rngs=rngs)  # one input channel: the scan
    # decoder[0] is d1 (full resolution), decoder[-1] the deepest.
    self.decoder = nnx.List([UpStage(f[s + 1], f[s], dtype=dtype, rngs=rngs) for s in range(len(f) - 1)])
    self.head = layers.pointwise(f[0], num_classes, dtype, rngs, use_bias=True)
    self.dtype = dtype
    self.deterministic = False  # set by model.train() / model.eval()

  def __call__(self, x_BHWC: jax.Array) -> Output:
    check_input(x_BHWC, self.stride, 'UNet')
    *skips, x = self.encoder(x_BHWC.astype(self.dtype))
    for stage, skip in zip(reversed(self.decoder), reversed(skips)):
      x = stage(x, skip)
    return network_output(self.head(x), [], self.deterministic)
