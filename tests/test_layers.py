"""Layer-level checks: the hand-written gradients in models/layers.py against plain autodiff, and what the
blocks and the EAS module compute."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easunet_jax.models import layers
from easunet_jax.models.eas import EAS


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


def test_up_convolution_puts_each_kernel_tap_in_its_place_of_the_2x2_cell():
  up = layers.UpConv(1, 1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  up.kernel[...] = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  y = up(jnp.array([1.0, 10.0]).reshape(1, 1, 2, 1))[0, :, :, 0]
  np.testing.assert_array_equal(y, [[1, 2, 10, 20], [3, 4, 30, 40]])


def test_batch_norm_running_statistics_move_a_tenth_of_the_way_as_pytorchs():
  bn = layers.batch_norm(1, jnp.float32, nnx.Rngs(0))
  bn(jnp.full((1, 2, 2, 1), 5.0))
  np.testing.assert_allclose(bn.mean[...], [0.5], rtol=1e-6)


def test_max_pool_takes_each_windows_maximum_and_sends_its_gradient_to_one_element():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 8, 3)).astype(np.float32)
  x[0, :2, :2, 0] = 1.5  # a window of four equal maxima
  x[1, 2:4, 4:6, 2] = [[0.0, 2.0], [2.0, -1.0]]  # two
  expected = x.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), expected)
  cotangent = rng.uniform(1.0, 2.0, expected.shape).astype(np.float32)
  grad = np.asarray(jax.vjp(layers.max_pool_2x2, x)[1](cotangent)[0])
  windows = grad.reshape(2, 3, 2, 4, 2, 3)
  # Each window's cotangent lands whole on one of its maxima (a rule that compared the input with the
  # result and split the gradient among the matches would divide by zero where XLA recomputed the input
  # with other rounding).
  assert np.all(np.count_nonzero(windows, axis=(2, 4)) == 1)
  np.testing.assert_array_equal(windows.sum(axis=(2, 4)), cotangent)
  chosen = np.where(windows != 0, x.reshape(windows.shape), -np.inf).max(axis=(2, 4))
  np.testing.assert_array_equal(chosen, expected)  # and it is a maximum


def test_separable_block_is_depthwise_bn_leaky_relu_pointwise_bn_hard_swish():
  """One channel, the depthwise kernel its centre tap 2, the pointwise weight -100, each BatchNorm with
  statistics and an affine of its own: an input of -1 goes -2 (depthwise), (-2 - 1) / 2 = -1.5 (BN 1),
  -0.015 (LeakyReLU), 1.5 (pointwise), 2 (1.5 - 0.5) + 0.25 = 2.25 (BN 2), 2.25 * 5.25 / 6 (h-swish). Any
  step left out or moved gives another value."""
  block = layers.SeparableBlock(1, 1, impl='shift', dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.depthwise.kernel[...] = jnp.zeros((3, 3, 1)).at[1, 1, 0].set(2.0)
  block.pointwise.kernel[...] = jnp.full((1, 1), -100.0)
  for bn, (mean, var, scale, bias) in ((block.bn1, (1.0, 4.0, 1.0, 0.0)), (block.bn2, (0.5, 1.0, 2.0, 0.25))):
    bn.mean[...], bn.var[...] = jnp.full((1,), mean), jnp.full((1,), var - layers.BN_EPS)
    bn.scale[...], bn.bias[...] = jnp.full((1,), scale), jnp.full((1,), bias)
  block.eval()
  out = block(-jnp.ones((1, 4, 4, 1)))
  np.testing.assert_allclose(out, 2.25 * 5.25 / 6, rtol=1e-5)


def test_eca_weighs_each_channel_by_the_sigmoid_of_its_mean():
  """One channel, its one tap 1: a map of mean 1 (values 0 and 2) is scaled by sigmoid(1)."""
  eca = layers.ECA(1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  eca.conv.kernel[...] = jnp.ones_like(eca.conv.kernel[...])
  x = jnp.array([[0.0, 2.0], [0.0, 2.0]]).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(eca(x), x * jax.nn.sigmoid(1.0), rtol=1e-6)


def test_eas_module_uses_its_rates_eca_and_the_images_mean():
  module = EAS(4, (6, 12, 18), impl='shift', dtype=jnp.float32, rngs=nnx.Rngs(0))
  module.eval()
  assert [branch.depthwise.dilation for branch in module.atrous] == [6, 12, 18]
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  seen = []
  image_pool = module.image_pool
  module.image_pool = lambda pooled: seen.append(pooled) or image_pool(pooled)
  with_eca = module(x)
  np.testing.assert_allclose(seen[0], x.mean(axis=(1, 2), keepdims=True), rtol=1e-6)  # the mean, not max
  module.eca = None
  assert not np.allclose(module(x), with_eca, atol=1e-3)  # the 1x1 branch's attention counts


def test_eca_weighs_each_channel_by_its_own_neighbourhood():
  """Eight channels (k = 3): channel c's weight is sigmoid of the conv of the channel means around c, so a
  kernel of its centre tap alone weighs each channel by the sigmoid of its own mean."""
  eca = layers.ECA(8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert eca.k == 3
  eca.conv.kernel[...] = jnp.zeros_like(eca.conv.kernel[...]).at[1].set(1.0)
  x = jnp.broadcast_to(jnp.arange(8.0) - 4.0, (1, 2, 2, 8))
  np.testing.assert_allclose(eca(x), x * jax.nn.sigmoid(jnp.arange(8.0) - 4.0), rtol=1e-6)
  eca.conv.kernel[...] = jnp.zeros_like(eca.conv.kernel[...]).at[0].set(1.0)  # the previous channel's
  means = jnp.concatenate([jnp.zeros(1), jnp.arange(7.0) - 4.0])
  np.testing.assert_allclose(eca(x), x * jax.nn.sigmoid(means), rtol=1e-6)


def test_batch_norm_epsilon_is_pytorchs():
  """BatchNorm in evaluation: (x - mean) / sqrt(var + 1e-5), PyTorch's default eps."""
  bn = layers.batch_norm(1, jnp.float32, nnx.Rngs(0))
  bn.var[...] = jnp.full((1,), 1e-4)
  bn.eval()
  np.testing.assert_allclose(bn(jnp.ones((1, 1, 1, 1))).ravel(), [1 / np.sqrt(1e-4 + 1e-5)], rtol=1e-5)


def test_up_convolution_adds_its_bias():
  up = layers.UpConv(1, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  up.kernel[...] = jnp.zeros_like(up.kernel[...])
  up.bias[...] = jnp.array([0.5, -2.0])
  np.testing.assert_array_equal(up(jnp.ones((1, 1, 1, 1))), jnp.broadcast_to(jnp.array([0.5, -2.0]),
                                                                          (1, 2, 2, 2)))
