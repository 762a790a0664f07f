"""On-device augmentation: the drawn parameters follow their documented ranges, the resample is
scipy's (bilinear image, nearest-neighbour labels that stay exact), and the result does not depend on how
many devices share the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import ndimage

from configs import default
from easunet_jax import parallel, steps
from easunet_jax.data import augment


def _batch(batch_size=4, h=48, w=40):
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 3, (batch_size, h // 8, w // 8))
  return {'image': rng.random((batch_size, h, w, 1), np.float32),
          'label': ndimage.zoom(blocks, (1, 8, 8), order=0).astype(np.int32)}


@pytest.fixture(scope='module')
def drawn():
  return jax.device_get(jax.jit(augment.sample_parameters, static_argnums=1)(jax.random.key(3), 20000))


@pytest.mark.parametrize('name, low, high', [
    ('angle', -np.deg2rad(10), np.deg2rad(10)), ('zoom', 0.9, 1.1), ('shift', -0.08, 0.08),
    ('gamma', 0.8, 1.25), ('intensity', 0.9, 1.1)])
def test_parameters_are_uniform_over_the_documented_ranges(drawn, name, low, high):
  ranges = augment.Ranges()
  assert (ranges.rotate_deg, ranges.scale, ranges.shift, ranges.gamma, ranges.intensity) == (
      10.0, (0.9, 1.1), 0.08, (0.8, 1.25), (0.9, 1.1))
  values = drawn[name].reshape(len(drawn[name]), -1)
  for column in values.T:  # each shift axis on its own
    assert low <= column.min() and column.max() <= high
    # The range is covered to its ends, and each quarter of it holds a quarter of the draws.
    assert column.min() < low + 0.01 * (high - low) and column.max() > high - 0.01 * (high - low)
    quarters = np.histogram(column, bins=4, range=(low, high))[0] / len(column)
    np.testing.assert_allclose(quarters, 0.25, atol=0.015)
  assert abs(np.corrcoef(drawn['zoom'], drawn['gamma'])[0, 1]) < 0.03  # drawn independently


def test_the_configs_rotation_range_is_the_one_drawn():
  config = default.get_config()
  config.data.augment_rotate_deg = 25.0
  ranges = steps.augment_ranges(config.data)
  angles = np.rad2deg(jax.device_get(augment.sample_parameters(jax.random.key(0), 2000, ranges)['angle']))
  assert -25 <= angles.min() < -24 and 24 < angles.max() <= 25
  config.data.augment = False
  assert steps.augment_ranges(config.data) is None

def test_resample_is_scipys_and_labels_stay_exact():
  batch = _batch()
  params = augment.sample_parameters(jax.random.key(0), 4)
  out = jax.device_get(jax.jit(augment.apply)(params, jax.tree.map(jnp.asarray, batch)))
  assert out['label'].dtype == np.int32 and out['image'].dtype == np.float32
  assert set(np.unique(out['label'])) <= {0, 1, 2}
  assert np.mean(out['label'] != batch['label']) > 0.01  # it moved something
  size = np.array(batch['label'].shape[1:], np.float64)
  centre = (size - 1) / 2
  for b in range(4):
    p = {k: np.asarray(v[b], np.float64) for k, v in params.items()}
    rotation = np.array([[np.cos(p['angle']), -np.sin(p['angle'])], [np.sin(p['angle']), np.cos(p['angle'])]])
    matrix = rotation / p['zoom']
    offset = centre - matrix @ (centre + p['shift'] * size)
    label = ndimage.affine_transform(batch['label'][b], matrix, offset, order=0, mode='grid-constant')
    image = ndimage.affine_transform(batch['image'][b, ..., 0], matrix, offset, order=1, mode='grid-constant')
    np.testing.assert_array_equal(out['label'][b], label)
    np.testing.assert_allclose(out['image'][b, ..., 0], np.maximum(image, 0) ** p['gamma'] * p['intensity'],
                               atol=1e-5)


def test_identity_parameters_change_nothing():
  batch = _batch()
  identity = {'angle': jnp.zeros(4), 'zoom': jnp.ones(4), 'shift': jnp.zeros((4, 2)), 'gamma': jnp.ones(4),
              'intensity': jnp.ones(4)}
  out = jax.device_get(augment.apply(identity, jax.tree.map(jnp.asarray, batch)))
  np.testing.assert_array_equal(out['label'], batch['label'])
  np.testing.assert_allclose(out['image'], batch['image'], atol=1e-6)


def test_same_augmentation_on_one_device_and_on_four():
  batch = jax.tree.map(jnp.asarray, _batch(batch_size=8))
  key = jax.random.key(5)
  single = jax.jit(augment.augment, out_shardings=NamedSharding(parallel.make_mesh(jax.devices()[:1]), P()))
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  sharded = jax.jit(augment.augment, in_shardings=(None, NamedSharding(mesh, P('data'))))
  one, four = jax.device_get(single(key, batch)), jax.device_get(sharded(key, batch))
  for name in ('image', 'label'):
    np.testing.assert_array_equal(one[name], four[name])
  assert not np.array_equal(one['image'], jax.device_get(sharded(jax.random.key(6), batch))['image'])


def test_step_keys_are_not_the_initialisation_keys():
  """nnx.Rngs(seed) draws fold_in(key(seed), n): the augmentation of step n must not reuse that key."""
  def data(key):
    return tuple(np.asarray(jax.random.key_data(key)))

  init = {data(jax.random.fold_in(jax.random.key(0), n)) for n in range(100)}
  steps = {data(augment.step_key(0, n)) for n in range(100)}
  assert len(steps) == 100 and not init & steps
  assert data(augment.step_key(0, 5)) != data(augment.step_key(1, 5))
