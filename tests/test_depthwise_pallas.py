"""The Pallas depthwise 3x3 (models/depthwise_pallas.py) in Pallas' interpreter on CPU, against XLA's
grouped convolution (`layers.depthwise_xla`): values, both gradients, bfloat16, and the wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easunet_jax.errors import ConfigError
from easunet_jax.models import depthwise_pallas, layers


def _inputs(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32), dtype)
               for s in (shape, (3, 3, shape[-1]), shape))  # x, kernel, cotangent


def _vjp(fn, x, kernel, cotangent):
  out, pullback = jax.vjp(fn, x, kernel)
  return (out,) + pullback(cotangent)


def _close(ours, reference, tol):
  # Relative to the largest reference value: the kernel gradient sums hundreds of products.
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32), rtol=tol,
                             atol=tol * float(np.max(np.abs(np.asarray(reference, np.float32)))))


@pytest.mark.parametrize('shape, dilation, blocks', [
    ((2, 12, 20, 12), 1, (8, 8, 8)),  # 2 x 3 x 2 tiles, every axis rounded up to whole tiles
    ((1, 12, 20, 20), 6, (8, 16, 32)),  # the default tile, channels padded 20 -> 32
    ((1, 8, 8, 12), 18, (8, 16, 32)),  # dilation past the map: only the centre tap sees data
    ((1, 6, 12, 20), 6, (8, 16, 32)),  # past the map's height only: halo on the columns alone
])
def test_float32_values_and_gradients_match_xla(shape, dilation, blocks):
  x, kernel, cotangent = _inputs(shape)
  block_h, block_w, block_c = blocks
  ours = _vjp(lambda x, k: depthwise_pallas.depthwise(x, k, dilation, interpret=True, block_h=block_h,
                                                       block_w=block_w, block_c=block_c),
              x, kernel, cotangent)
  reference = _vjp(lambda x, k: layers.depthwise_xla(x, k, dilation), x, kernel, cotangent)
  for name, a, b in zip(('out', 'dx', 'dkernel'), ours, reference):
    assert a.shape == b.shape and a.dtype == jnp.float32, name
    _close(a, b, 1e-5)


def test_bfloat16_rounds_once_and_accumulates_the_kernel_gradient_in_float32():
  shape, dilation = (2, 12, 20, 12), 6
  x, kernel, cotangent = _inputs(shape, seed=1, dtype=jnp.bfloat16)
  f32 = [a.astype(jnp.float32) for a in (x, kernel, cotangent)]
  reference = _vjp(lambda x, k: layers.depthwise_xla(x, k, dilation), *f32)

  # All bfloat16: values and gradients to bfloat16 rounding of the float32 result.
  ours = _vjp(lambda x, k: depthwise_pallas.depthwise(x, k, dilation, interpret=True), x, kernel, cotangent)
  for name, a, b in zip(('out', 'dx', 'dkernel'), ours, reference):
    assert a.dtype == jnp.bfloat16, name
    _close(a, b, 1e-2)

  # A float32 kernel with a bfloat16 map: the output stays bfloat16, and the kernel gradient, a sum of
  # 480 exact products per tap, matches float32 to 1e-5, which a bfloat16 accumulator could not.
  out, pullback = jax.vjp(lambda x, k: depthwise_pallas.depthwise(x, k, dilation, interpret=True),
                          x, f32[1])
  dx, dkernel = pullback(cotangent)
  assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
  _close(dkernel, reference[2], 1e-5)


def test_the_gradient_runs_the_pallas_kernel_twice_more():
  x, kernel, cotangent = _inputs((1, 8, 8, 4))
  fn = lambda x, k: depthwise_pallas.depthwise(x, k, 1, interpret=True)  # noqa: E731
  assert str(jax.make_jaxpr(fn)(x, kernel)).count('pallas_call') == 1
  backward = jax.make_jaxpr(lambda x, k, g: jax.vjp(fn, x, k)[1](g))(x, kernel, cotangent)
  assert str(backward).count('pallas_call') == 3  # forward, input gradient, kernel gradient
  with pytest.raises(ValueError, match='power of two'):
    depthwise_pallas.depthwise(x, kernel, 1, interpret=True, block_w=12)


def test_pallas_impl_needs_a_gpu_unless_interpreted(monkeypatch):
  assert jax.default_backend() == 'cpu'
  with pytest.raises(ConfigError, match="'pallas' needs a GPU backend"):
    layers.resolve_depthwise_impl('pallas')
  monkeypatch.setattr(depthwise_pallas, 'INTERPRET', True)
  assert layers.resolve_depthwise_impl('pallas') == 'pallas'
  assert layers.resolve_depthwise_impl('auto') != 'pallas'

  # The layer dispatches to the kernel: same output as the XLA layer with the same parameters.
  layer = layers.DepthwiseConv(4, dilation=6, impl='pallas', rngs=nnx.Rngs(0))
  reference = layers.DepthwiseConv(4, dilation=6, impl='xla', rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).standard_normal((1, 8, 8, 4), np.float32)
  assert 'pallas_call' in str(jax.make_jaxpr(layer)(x))
  _close(layer(x), reference(x), 1e-5)
