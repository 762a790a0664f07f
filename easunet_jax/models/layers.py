"""Building blocks of the EAS U-Net: depthwise-separable convolution, ECA, up-sampling, pooling.

Convolutions that XLA:CPU runs badly are written out by hand: a depthwise 3x3 as nine shifted
multiply-adds with its own VJP (grouped convolution is far slower there), and in training as a small C++
kernel (`depthwise_cpu`) where a compiler is at hand, a 2x2 stride-2 transposed convolution as one
matmul plus depth-to-space, and 1x1 convolutions as 2-D matmuls with their own VJP (`nnx.Linear` layers
whose contraction is `matmul_2d`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.errors import ConfigError
from easunet_jax.models import depthwise_cpu, depthwise_pallas

BN_MOMENTUM = 0.9  # flax convention; PyTorch's momentum=0.1
BN_EPS = 1e-5
LEAKY_SLOPE = 0.01


def leaky_relu(x: jax.Array) -> jax.Array:
  return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def batch_norm(channels: int, dtype: DTypeLike, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, rngs=rngs)


@jax.custom_vjp
def matmul_2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., C_in) @ kernel (C_in, C_out) as one 2-D matmul, with a hand-written VJP.

  Autodiff of the N-D contraction left XLA:CPU to pick the layouts of the backward pass: it wrote the
  incoming gradient out transposed (fused into the BatchNorm backward, a strided pass over the map)
  before the kernel-gradient matmul. Spelled out on (N, C) matrices, the two gradient matmuls read
  their operands in place.
  """
  return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _matmul_2d_fwd(x, kernel):
  return matmul_2d(x, kernel), (x, kernel)


def _matmul_2d_bwd(residuals, g):
  x, kernel = residuals
  x_NC, g_NK = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dx = jax.lax.dot_general(g_NK, kernel, (((1,), (1,)), ((), ()))).reshape(x.shape)
  # The kernel gradient sums over every pixel: accumulate in at least float32 (bfloat16 compute).
  acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  dkernel = jax.lax.dot_general(x_NC, g_NK, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
  return dx, dkernel.astype(kernel.dtype)


matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _last_axis_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None,
                           out_sharding=None):
  """nnx.Linear's `dot_general` hook: the contraction it asks for (last axis of x with the kernel's
  first) done by `matmul_2d`."""
  del precision, preferred_element_type, out_sharding  # float32 or the model dtype throughout
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f'pointwise layers contract the last axis only, got {dimension_numbers}')
  return matmul_2d(x, kernel)


def pointwise(c_in: int, c_out: int, dtype: DTypeLike, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  """1x1 convolution on NHWC maps: a matmul over the channel axis (`matmul_2d`)."""
  return nnx.Linear(c_in, c_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
                    dot_general=_last_axis_dot_general)


def resolve_depthwise_impl(impl: str, dtype: DTypeLike = jnp.float32) -> str:
  """'auto' -> on CPU 'native' (float32) else 'shift'; elsewhere 'xla'.

  'native' runs the C++ kernel (`depthwise_cpu`) in training and XLA's stencil ('shift') in evaluation;
  from 'auto', the kernel is compiled as a training first traces it, and where it cannot be (no C++
  compiler) training runs the stencil too: evaluation and predict never build it.
  'pallas' runs the Pallas (Triton) kernel of `depthwise_pallas`, on a GPU backend, or anywhere in
  Pallas' interpreter when `depthwise_pallas.INTERPRET` is set (tests). 'auto' stays 'xla' on GPU until
  the Pallas kernel is measured to beat it there.
  """
  if impl not in ('auto', 'xla', 'shift', 'native', 'pallas'):
    raise ConfigError("model.depthwise_impl must be 'auto', 'xla', 'shift', 'native' or 'pallas', "
                      f"got {impl!r}")
  native_ok = jax.default_backend() == 'cpu' and jnp.dtype(dtype) == jnp.float32
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    return 'native' if native_ok else 'shift'
  if impl == 'native' and not (native_ok and depthwise_cpu.available()):
    raise ConfigError("model.depthwise_impl='native' needs the CPU backend, float32 and a C++ compiler")
  if impl == 'pallas' and jax.default_backend() != 'gpu' and not depthwise_pallas.INTERPRET:
    raise ConfigError("model.depthwise_impl='pallas' needs a GPU backend")
  return impl


def _taps(size_h: int, size_w: int, dilation: int) -> list[tuple[int, int]]:
  """Kernel offsets (i, j) in {-1, 0, 1}^2 whose dilated tap can touch an h x w map."""
  live_taps = depthwise_pallas.live_taps
  return [(i, j) for i in live_taps(size_h, dilation) for j in live_taps(size_w, dilation)]


def _stencil(x: jax.Array, kernel: jax.Array, dilation: int, mirror: bool) -> jax.Array:
  """sum over taps of x shifted by (+-i d, +-j d) times kernel[i, j]: x padded once, then sliced per tap.

  Padding each tap separately made XLA:CPU write out a padded copy of the map per tap.
  """
  _, h, w, _ = x.shape
  sign = -1 if mirror else 1
  xp = jnp.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
  out = None
  for i, j in _taps(h, w, dilation):
    top, left = dilation + sign * i * dilation, dilation + sign * j * dilation
    term = xp[:, top:top + h, left:left + w, :] * kernel[i + 1, j + 1]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_shift(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Depthwise 3x3 cross-correlation, 'same' zero padding: sum over taps of shifted x * kernel.

  kernel: (3, 3, C) indexed by offset + 1. Taps that only reach padding are skipped.
  """
  return _stencil(x, kernel, dilation, mirror=False)


def _depthwise_shift_fwd(x, kernel, dilation):
  return depthwise_shift(x, kernel, dilation), (x, kernel)


def _depthwise_shift_bwd(dilation, residuals, g):
  x, kernel = residuals
  _, h, w, _ = x.shape
  # The input gradient is the same stencil with the kernel mirrored: shift g the opposite way.
  dx = _stencil(g, kernel, dilation, mirror=True)
  # Kernel gradients accumulate in at least float32, also when the network computes in bfloat16.
  acc_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), (dilation, dilation), (dilation, dilation), (0, 0)))
  dk = jnp.zeros(kernel.shape, acc_dtype)
  for i, j in _taps(h, w, dilation):
    top, left = dilation + i * dilation, dilation + j * dilation
    dk = dk.at[i + 1, j + 1].set(
        jnp.sum(xp[:, top:top + h, left:left + w, :] * g, axis=(0, 1, 2), dtype=acc_dtype))
  return dx, dk.astype(kernel.dtype)


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

  def __init__(self, channels: int, *, dilation: int = 1, impl: str = 'auto', dtype: DTypeLike = jnp.float32,
               rngs: nnx.Rngs):
    # Same initialiser and fan-in as nnx.Conv with feature_group_count=channels: lecun_normal, fan_in 9.
    init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    self.kernel = nnx.Param(init(rngs.params(), (3, 3, channels)))
    self.dilation = dilation
    self.impl = resolve_depthwise_impl(impl, dtype)
    self.dtype = dtype
    self.deterministic = False  # set by model.train() / model.eval()

  def __call__(self, x: jax.Array) -> jax.Array:
    # Without a backward pass to feed, XLA's own stencil beats the native kernel: it fuses the BatchNorm
    # and activation around it into the same loop, which it cannot do across a custom call.
    impl = self.impl
    if impl == 'native' and (self.deterministic or not depthwise_cpu.available()):
      impl = 'shift'
    fn = {'shift': depthwise_shift, 'xla': depthwise_xla, 'native': depthwise_cpu.depthwise,
          'pallas': depthwise_pallas.depthwise}[impl]
    return fn(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.dilation)


class SeparableBlock(nnx.Module):
  """DS block: depthwise 3x3, BN, LeakyReLU(0.01), pointwise 1x1, BN, h-swish."""

  def __init__(self, c_in: int, c_out: int, *, impl: str, dtype: DTypeLike, rngs: nnx.Rngs):
    self.depthwise = DepthwiseConv(c_in, impl=impl, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(c_in, dtype, rngs)
    self.pointwise = pointwise(c_in, c_out, dtype, rngs)
    self.bn2 = batch_norm(c_out, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = leaky_relu(self.bn1(self.depthwise(x)))
    return jax.nn.hard_swish(self.bn2(self.pointwise(x)))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
  """ECA-Net's adaptive kernel: t = int(|log2(C) + b| / gamma), made odd."""
  t = int(abs(math.log2(channels) + b) / gamma)
  return t if t % 2 else t + 1


class ECA(nnx.Module):
  """Efficient channel attention: GAP, 1-D conv across channels (k taps, no bias), sigmoid, rescale."""

  def __init__(self, channels: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.k = eca_kernel_size(channels)
    self.conv = nnx.Conv(1, 1, kernel_size=(self.k,), padding=(self.k - 1) // 2, use_bias=False,
                         dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    pooled_BC1 = jnp.mean(x_BHWC, axis=(1, 2))[:, :, None]  # channels become the conv's length axis
    weights_BC = jax.nn.sigmoid(self.conv(pooled_BC1)[:, :, 0])
    return x_BHWC * weights_BC[:, None, None, :].astype(x_BHWC.dtype)


class UpConv(nnx.Module):
  """2x2 transposed convolution, stride 2, with bias: one (N, C_in) @ (C_in, 4 C_out) + depth-to-space."""

  def __init__(self, c_in: int, c_out: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
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
  """2x2 max-pooling, stride 2, whose gradient goes wholly to one element of each window.

  Pairwise selections, not `max(axis=...)`: JAX differentiates a max reduction by comparing its input with
  the result for equality and dividing by the number of matches, and XLA may recompute the input for the
  backward pass with other rounding (XLA:CPU at -O0 did, which made U-Net's gradients NaN from its second
  step; XLA:GPU's fusions may). A selection sends the gradient to the element it picked, however rounded.
  It is also faster on XLA:CPU than the reduction or `lax.reduce_window`.
  """
  b, h, w, c = x_BHWC.shape
  x = x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c)
  x = jnp.where(x[:, :, 0] >= x[:, :, 1], x[:, :, 0], x[:, :, 1])
  return jnp.where(x[:, :, :, 0] >= x[:, :, :, 1], x[:, :, :, 0], x[:, :, :, 1])
