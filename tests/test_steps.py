"""The jitted core: PyTorch SGD semantics, the poly schedule, a non-finite step changes nothing, a
4-device step (augmentation included) equals a 1-device step, and a bfloat16 step keeps a float32 state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from easunet_jax import losses, parallel, steps
from easunet_jax.data import augment, pipeline
from easunet_jax.errors import ConfigError


def test_optimizer_equals_pytorch_sgd_with_weight_decay():
  cfg = tiny.get_config().optim
  lr, mu, wd = cfg.lr, cfg.momentum, cfg.weight_decay
  tx = steps.make_optimizer(cfg, num_steps=10)
  params = {'w': jnp.array([1.0, -2.0, 3.0])}
  grads = [jnp.array([0.5, 0.1, -0.3]), jnp.array([-0.2, 0.4, 0.0]), jnp.array([1.0, -1.0, 2.0])]
  opt_state = tx.init(params)
  # PyTorch SGD: d = g + wd p; buf = d (first step) else mu buf + d; p -= lr buf.
  p, buf = np.array(params['w']), None
  for g in grads:
    updates, opt_state = tx.update({'w': g}, opt_state, params)
    params = optax.apply_updates(params, updates)
    d = np.asarray(g) + wd * p
    buf = d if buf is None else mu * buf + d
    p = p - lr * buf
    np.testing.assert_allclose(params['w'], p, rtol=1e-6)
  # The other order (momentum, then decay added after) is not PyTorch, and the test can tell.
  swapped = optax.chain(optax.sgd(lr, momentum=mu), optax.add_decayed_weights(-lr * wd))
  q, s = {'w': jnp.array([1.0, -2.0, 3.0])}, None
  s = swapped.init(q)
  for g in grads:
    u, s = swapped.update({'w': g}, s, q)
    q = optax.apply_updates(q, u)
  assert not np.allclose(q['w'], p, rtol=1e-6)


def test_poly_schedule_decays_to_zero_and_bad_schedule_is_refused():
  cfg = tiny.get_config().optim
  cfg.schedule = 'poly'
  lr = steps.learning_rate_schedule(cfg, num_steps=100)
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(50)) == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-5)
  assert float(lr(100)) == pytest.approx(0.0)
  cfg.schedule = 'cosine'
  with pytest.raises(ConfigError, match=r'optim\.schedule'):
    steps.learning_rate_schedule(cfg, 100)


def _batch(batch_size=4, size=32):
  """A random batch in the slice store's dtypes, as the training loop sends them: tiny's steps here are the
  training's programs, compiled once for the suite."""
  rng = np.random.default_rng(0)
  return {'image': rng.random((batch_size, size, size, 1), np.float32).astype(np.float16),
          'label': rng.integers(0, 3, (batch_size, size, size)).astype(np.uint8)}


def _one_step(devices, dtype='float32'):
  config = tiny.get_config()
  config.data.augment = True
  config.model.dtype = dtype
  mesh = parallel.make_mesh(devices)
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef, state = steps.create_train_state(
      config, tx, parallel.shardings(mesh)[1])
  p_train_step, _ = steps.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  state, metrics = p_train_step(state, pipeline.put_on_mesh(_batch(), parallel.shardings(mesh)[0]))
  return jax.device_get(state), metrics.compute()


def test_a_step_with_a_non_finite_loss_changes_only_the_step_counts():
  config = tiny.get_config()
  mesh = parallel.make_mesh()
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef, state = steps.create_train_state(config, tx, parallel.shardings(mesh)[1])
  before = jax.device_get(state)  # the step donates `state`
  p_train_step, _ = steps.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  batch = _batch()
  batch['image'][1, 5, 7] = np.nan
  state, bad = p_train_step(state, pipeline.put_on_mesh(batch, parallel.shardings(mesh)[0]))
  metrics = bad.compute()
  assert int(state.step) == 1
  assert (int(metrics['skipped_steps']), int(metrics['first_nonfinite_step'])) == (1, 1)
  # The learning-rate schedule follows the steps, skipped ones too; nothing else moves.
  assert int(optax.tree_utils.tree_get(state.opt_state, 'count')) == 1
  trace = optax.tree_utils.tree_get(state.opt_state, 'trace')
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, trace)),
                  jax.tree.leaves((before.params, before.batch_stats,
                                   optax.tree_utils.tree_get(before.opt_state, 'trace')))):
    np.testing.assert_array_equal(np.asarray(a), b)
  # A period with a skipped step logs the others' losses.
  state, clean = p_train_step(state, pipeline.put_on_mesh(_batch(), parallel.shardings(mesh)[0]))
  period = jax.device_get(bad.merge(clean).compute())
  assert np.isfinite(period['loss']) and period['loss'] == pytest.approx(float(clean.compute()['loss']))
  assert (int(period['skipped_steps']), int(period['first_nonfinite_step'])) == (1, 1)


def test_a_period_counts_every_skipped_step_and_names_the_first():
  def step_metrics(step, finite):
    loss = jnp.array([float(step) if finite else jnp.nan])
    return steps.TrainMetrics.single_from_model_output(loss=loss, loss_final=loss, mask=jnp.array([finite]),
                                                       step=jnp.array(step), nonfinite=jnp.array(not finite))

  period = step_metrics(1, True)
  for step, finite in ((2, False), (3, False), (4, True)):
    period = period.merge(step_metrics(step, finite))
  summary = period.compute()
  assert int(summary['first_nonfinite_step']) == 2 and int(summary['skipped_steps']) == 2
  assert float(summary['loss']) == pytest.approx(2.5)  # steps 1 and 4


def test_train_step_on_four_devices_equals_one_device():
  assert jax.device_count() == 4
  (state4, metrics4), (state1, metrics1) = _one_step(jax.devices()), _one_step(jax.devices()[:1])
  np.testing.assert_allclose(metrics4['loss'], metrics1['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((state4.params, state4.batch_stats)),
                  jax.tree.leaves((state1.params, state1.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_step_computes_in_bfloat16_and_keeps_a_float32_state():
  """Traced, not compiled: the dtypes are the claim (the bfloat16 demo's Dice is in the README)."""
  config = tiny.get_config()
  config.model.dtype = 'bfloat16'
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef = steps.graphdefs(config)
  state = jax.eval_shape(lambda: steps.init_state(config, tx))
  batch = {'image': jax.ShapeDtypeStruct((4, 32, 32, 1), jnp.float16),
           'label': jax.ShapeDtypeStruct((4, 32, 32), jnp.uint8)}
  new_state, metrics = jax.eval_shape(functools.partial(
      steps.train_step, graphdef=train_graphdef, tx=tx, loss_cfg=config.loss, seed=0,
      augment_ranges=augment.Ranges(), synthesise=False), state, batch)
  floats = [leaf.dtype for leaf in jax.tree.leaves((new_state.params, new_state.batch_stats,
                                                     new_state.opt_state))
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  assert metrics.loss.total.dtype == jnp.float32
  # Every matmul of the network (1x1 convolutions, up-sampling, heads) runs in bfloat16; the logits come
  # out in float32 for the loss.
  forward = jax.make_jaxpr(functools.partial(steps.forward, graphdef=eval_graphdef))(state, batch['image'])
  matmuls = [line.split('=')[0] for line in str(forward).splitlines() if 'dot_general[' in line]
  assert len(matmuls) > 10 and all(':bf16[' in out for out in matmuls), matmuls
  assert forward.out_avals[0].dtype == jnp.float32


def test_validation_counts_leave_out_the_store_padding(monkeypatch):
  """Femoral cartilage predicted everywhere: only the slices' own pixels (batch['valid']) count, as
  evaluation crops the padding off."""
  label = np.zeros((2, 8, 8), np.int32)
  label[:, 2:4, 2:4] = 1
  valid = np.zeros((2, 8, 8), bool)
  valid[:, 1:7, 1:7] = True
  femoral_everywhere = jax.nn.one_hot(jnp.ones((2, 8, 8), int), 3)
  monkeypatch.setattr(steps, 'forward', lambda state, image, graphdef: femoral_everywhere)
  out = steps.eval_step(None, {'image': np.zeros((2, 8, 8, 1), np.float32), 'label': label, 'valid': valid,
                               'mask': np.ones(2, bool)}, graphdef=None, num_classes=3)
  # (TP, FP, FN) per slice: FC 4 labelled pixels found, 32 more of the 6 x 6 marked; TC none.
  np.testing.assert_array_equal(out['counts'], [[[4, 32, 0], [0, 0, 0]]] * 2)


def test_validation_loss_leaves_out_the_batch_padding(monkeypatch):
  """The samples that pad the last batch (batch['mask'] False) count neither in the loss nor in
  num_valid: the loss of a real slice and a padding slice is the real slice's alone."""
  label = np.zeros((2, 8, 8), np.int32)
  label[0, 2:4, 2:4] = 1  # the padding sample (a copy of nothing) has no cartilage
  femoral_everywhere = jax.nn.one_hot(jnp.ones((2, 8, 8), int), 3)
  monkeypatch.setattr(steps, 'forward', lambda state, image, graphdef: femoral_everywhere[:len(image)])

  def step(mask):
    n = len(mask)
    return steps.eval_step(None, {'image': np.zeros((n, 8, 8, 1), np.float32), 'label': label[:n],
                                  'valid': np.ones((n, 8, 8), bool), 'mask': np.array(mask)},
                           graphdef=None, num_classes=3)

  def loss(out, dice_eps=1.0):
    return losses.loss_of_sums(out['loss_sums'], dice_eps)

  padded, alone, both = step([True, False]), step([True]), step([True, True])
  assert int(padded['num_valid']) == 1
  np.testing.assert_allclose(loss(padded), loss(alone), rtol=1e-6)
  assert abs(float(loss(both)) - float(loss(alone))) > 0.01
  # The loss is the training loss, its loss.dice_eps included.
  np.testing.assert_allclose(loss(both, dice_eps=100.0),
                             losses.segmentation_loss(femoral_everywhere, label, 100.0), rtol=1e-6)
