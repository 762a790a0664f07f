"""Building blocks of the EAS U-Net: depthwise-separable convolution, ECA, up-sampling, pooling.

Convolutions that XLA:CPU runs badly are written out by hand: a depthwise 3x3 as nine shifted
multiply-adds with its own VJP (grouped convolution is ~30x slower there), a 2x2 stride-2 transposed
convolution as one matmul plus depth-to-space, and 1x1 convolutions as 2-D matmuls (`nnx.Linear`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9  # flax convention; PyTorch's momentum=0.1
BN_EPS = 1e-5
LEAKY_SLOPE = 0.01


def hard_swish(x: jax.Array) -> jax.Array:
  """h-swish(x) = x * relu6(x + 3) / 6 (MobileNetV3)."""
  return jax.nn.hard_swish(x)


def leaky_relu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def batch_norm(channels: int, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, rngs=rngs)


def pointwise(c_in: int, c_out: int, dtype, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  """1x1 convolution on NHWC maps: a matmul over the channel axis."""
  return nnx.Linear(c_in, c_out, use_bias=use_bias, dtype=dtype, rngs=rngs)


def resolve_depthwise_impl(impl: str) -> str:
  """'auto' -> 'shift' on CPU (grouped convolution is slow on XLA:CPU), else 'xla'."""
  if impl not in ('auto', 'xla', 'shift'):
    raise ValueError(f"model.depthwise_impl must be 'auto', 'xla' or 'shift', got {impl!r}")
  if impl == 'auto':
    return 'shift' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _live_taps(size: int, dilation: int) -> tuple[int, ...]:
  """Offsets (-1, 0, 1) whose dilated tap can touch the map; farther ones only see zero padding."""
  return tuple(o for o in (-1, 0, 1) if abs(o) * dilation < size)


def _shifted(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """x shifted so that out[h, w] = x[h + dy, w + dx], zero outside the map (NHWC)."""
  _, h, w, _ = x.shape
  pad = ((0, 0), (max(-dy, 0), max(dy, 0)), (max(-dx, 0), max(dx, 0)), (0, 0))
  xp = jnp.pad(x, pad)
  return xp[:, max(dy, 0):max(dy, 0) + h, max(dx, 0):max(dx, 0) + w, :]


def _taps(x: jax.Array, dilation: int) -> list[tuple[int, int, int, int]]:
  _, h, w, _ = x.shape
  return [(i, j, i * dilation, j * dilation)
          for i in _live_taps(h, dilation) for j in _live_taps(w, dilation)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Depthwise 3x3 cross-correlation, 'same' zero padding: sum over taps of shifted x * kernel.

  kernel: (3, 3, C) indexed by offset + 1. Taps that only reach padding are skipped.
  """
  out = jnp.zeros_like(x)
  for i, j, dy, dx in _taps(x, dilation):
    out = out + _shifted(x, dy, dx) * kernel[i + 1, j + 1]
  return out


def _depthwise_shift_fwd(x, kernel, dilation):
  return depthwise_shift(x, kernel, dilation), (x, kernel)


def _depthwise_shift_bwd(dilation, residuals, g):
  x, kernel = residuals
  # The input gradient is the same stencil with the kernel mirrored: shift g the opposite way.
  # Kernel gradients accumulate in at least float32, also when the network computes in bfloat16.
  acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  dx = jnp.zeros_like(x)
  dk = [[jnp.zeros(kernel.shape[-1:], acc_dtype)] * 3 for _ in range(3)]
  for i, j, dy, dxx in _taps(x, dilation):
    dx = dx + _shifted(g, -dy, -dxx) * kernel[i + 1, j + 1]
    dk[i + 1][j + 1] = jnp.sum(_shifted(x, dy, dxx) * g, axis=(0, 1, 2), dtype=acc_dtype)
  return dx, jnp.stack([jnp.stack(row) for row in dk]).astype(kernel.dtype)


depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def depthwise_xla(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """The same depthwise convolution as one grouped `lax.conv_general_dilated`."""
  c = x.shape[-1]
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], window_strides=(1, 1), padding=((dilation, dilation),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=c)


class DepthwiseConv(nnx.Module):
  """3x3 depthwise convolution (groups = channels), no bias, optional dilation."""

  def __init__(self, channels: int, *, dilation: int = 1, impl: str = 'auto', dtype=jnp.float32,
               rngs: nnx.Rngs):
    # Same initialiser and fan-in as nnx.Conv with feature_group_count=channels: lecun_normal, fan_in 9.
    init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.kernel = nnx.Param(init(rngs.params(), (3, 3, channels)))
    self.dilation = dilation
    self.impl = resolve_depthwise_impl(impl)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    fn = depthwise_shift if self.impl == 'shift' else depthwise_xla
    return fn(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.dilation)


class SeparableBlock(nnx.Module):
  """DS block: depthwise 3x3, BN, LeakyReLU(0.01), pointwise 1x1, BN, h-swish."""

  def __init__(self, c_in: int, c_out: int, *, impl: str, dtype, rngs: nnx.Rngs):
    self.depthwise = DepthwiseConv(c_in, impl=impl, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(c_in, dtype, rngs)
    self.pointwise = pointwise(c_in, c_out, dtype, rngs)
    self.bn2 = batch_norm(c_out, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = leaky_relu(self.bn1(self.depthwise(x)))
    return hard_swish(self.bn2(self.pointwise(x)))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA-Net's adaptive kernel: t = int(|log2(C) + b| / gamma), made odd."""
  t = int(abs(math.log2(channels) + b) / gamma)
  return t if t % 2 else t + 1


class ECA(nnx.Module):
  """Efficient channel attention: GAP, 1-D conv across channels (k taps, no bias), sigmoid, rescale."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.k = eca_kernel_size(channels)
    self.conv = nnx.Conv(1, 1, kernel_size=(self.k,), padding=(self.k - 1) // 2, use_bias=False,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    pooled_BC1 = jnp.mean(x_BHWC, axis=(1, 2))[:, :, None]  # channels become the conv's length axis
    weights_BC = jax.nn.sigmoid(self.conv(pooled_BC1)[:, :, 0])
    return x_BHWC * weights_BC[:, None, None, :].astype(x_BHWC.dtype)


class UpConv(nnx.Module):
  """2x2 transposed convolution, stride 2, with bias: one (N, C_in) @ (C_in, 4 C_out) + depth-to-space."""

  def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (c_in, 2, 2, c_out)))
    self.bias = nnx.Param(jnp.zeros((c_out,)))
    self.dtype = dtype

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    b, h, w, c_in = x_BHWC.shape
    c_out = self.bias.shape[0]
    kernel = self.kernel[...].astype(self.dtype).reshape(c_in, 4 * c_out)
    y = x_BHWC.astype(self.dtype).reshape(b * h * w, c_in) @ kernel
    y = y.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c_out)
    return y + self.bias[...].astype(self.dtype)


def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
  b, h, w, c = x_BHWC.shape
  return x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
