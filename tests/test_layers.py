"""Layer-level checks of the hand-written gradients in models/layers.py against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easunet_jax.models import layers


def test_matmul_2d_values_and_gradients_match_autodiff():
  rng = np.random.default_rng(0)
  x, kernel, cotangent = (rng.standard_normal(s, np.float32) for s in ((2, 5, 7, 6), (6, 4), (2, 5, 7, 4)))

  def vjp(fn):
    out, pullback = jax.vjp(fn, x, kernel)
    return (out,) + pullback(cotangent)

  plain = vjp(lambda x, k: jnp.einsum('bhwc,ck->bhwk', x, k))
  for ours, reference in zip(vjp(layers.matmul_2d), plain):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.max(np.abs(reference)))


def test_pointwise_layer_is_a_channel_matmul_and_bfloat16_keeps_float32_gradients():
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 3), np.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = layers.pointwise(3, 5, dtype, nnx.Rngs(0), use_bias=True)
    expected = x @ layer.kernel[...] + layer.bias[...]
    np.testing.assert_allclose(layer(x).astype(jnp.float32), expected, rtol=2e-2 if dtype == jnp.bfloat16
                               else 1e-6, atol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
    grad = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(layer)
    assert grad.kernel[...].dtype == jnp.float32 and grad.kernel[...].shape == (3, 5)
