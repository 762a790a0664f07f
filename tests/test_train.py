"""Training: PyTorch SGD semantics, 4-device step = 1-device step, resume = uninterrupted, logs, NaN, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from easunet_jax import checkpoints, train
from easunet_jax.data import pipeline


def test_optimizer_equals_pytorch_sgd_with_weight_decay():
  cfg = tiny.get_config().optim
  lr, mu, wd = cfg.lr, cfg.momentum, cfg.weight_decay
  tx = train.make_optimizer(cfg, num_steps=10)
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
  lr = train.learning_rate_schedule(cfg, num_steps=100)
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(50)) == pytest.approx(0.01 * 0.5 ** 0.9, rel=1e-5)
  assert float(lr(100)) == pytest.approx(0.0)
  cfg.schedule = 'cosine'
  with pytest.raises(ValueError, match='optim.schedule'):
    train.learning_rate_schedule(cfg, 100)


def _batch(batch_size=4, size=32):
  rng = np.random.default_rng(0)
  return {'image': rng.random((batch_size, size, size, 1), np.float32),
          'label': rng.integers(0, 3, (batch_size, size, size)).astype(np.int32)}


def _one_step(devices):
  config = tiny.get_config()
  mesh = train.make_mesh(devices)
  tx = train.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef, state = train.create_train_state(
      config, tx, NamedSharding(mesh, P()))
  p_train_step, _ = train.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  state, metrics = p_train_step(state, pipeline.put_on_mesh(_batch(), NamedSharding(mesh, P('data'))))
  return jax.device_get(state), metrics.compute()


def test_a_step_with_a_non_finite_loss_changes_only_the_step_count():
  config = tiny.get_config()
  mesh = train.make_mesh()
  tx = train.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef, state = train.create_train_state(config, tx, NamedSharding(mesh, P()))
  before = jax.device_get(state)  # the step donates `state`
  p_train_step, _ = train.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  batch = _batch()
  batch['image'][1, 5, 7] = np.nan
  state, metrics = p_train_step(state, pipeline.put_on_mesh(batch, NamedSharding(mesh, P('data'))))
  metrics = metrics.compute()
  assert int(state.step) == 1
  assert (int(metrics['skipped_steps']), int(metrics['first_nonfinite_step'])) == (1, 1)
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                  jax.tree.leaves((before.params, before.batch_stats, before.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_train_step_on_four_devices_equals_one_device():
  assert jax.device_count() == 4
  (state4, metrics4), (state1, metrics1) = _one_step(jax.devices()), _one_step(jax.devices()[:1])
  np.testing.assert_allclose(metrics4['loss'], metrics1['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((state4.params, state4.batch_stats)),
                  jax.tree.leaves((state1.params, state1.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class Killed(Exception):
  """Stands for the process being killed part-way through a step."""


def _config(phantom_dir):
  config = tiny.get_config()
  config.data.phantom_dir = str(phantom_dir)
  config.data.augment = True  # the augmentation's random stream must resume too
  config.checkpoint.every_steps = 2
  return config


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """One uninterrupted tiny run: (config, workdir, final state)."""
  root = tmp_path_factory.mktemp('straight')
  config = _config(root / 'phantom')
  return config, root / 'run', train.train_and_evaluate(config, root / 'run')


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(straight_run, tmp_path, monkeypatch):
  _, _, expected = straight_run
  config = _config(tmp_path / 'phantom')
  train_batches = {'n': 0}
  put_on_mesh = pipeline.put_on_mesh

  def dying_put_on_mesh(batch, sharding, **kwargs):
    train_batches['n'] += 'mask' not in batch  # validation batches carry a mask
    if train_batches['n'] == 6:  # killed in step 6: the newest checkpoint is step 4's
      raise Killed
    return put_on_mesh(batch, sharding, **kwargs)

  monkeypatch.setattr(pipeline, 'put_on_mesh', dying_put_on_mesh)
  with pytest.raises(Killed):
    train.train_and_evaluate(config, tmp_path / 'run')
  monkeypatch.setattr(pipeline, 'put_on_mesh', put_on_mesh)
  assert checkpoints.manager(tmp_path / 'run', 2).latest_step() == 4
  resumed = train.train_and_evaluate(config, tmp_path / 'run')
  assert int(resumed.step) == config.train.num_steps
  logged = [json.loads(line)['step'] for line in (tmp_path / 'run' / 'metrics.jsonl').open()]
  assert [s for s in logged if logged.count(s) > 1] == [3, 3, 6, 6]  # train + val rows, none twice
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state)),
                  jax.tree.leaves((expected.params, expected.batch_stats, expected.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metrics_log_and_checkpoints(straight_run):
  config, workdir, state = straight_run
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  keys = set().union(*rows)
  assert {'step', 'train/loss', 'train/loss_final', 'train/lr', 'train/steps_per_s', 'val/loss',
          'val/dice_fc', 'val/dice_tc', 'val/dice_mean'} <= keys
  assert [r['step'] for r in rows if 'val/dice_mean' in r] == [3, 6]
  assert all(0.0 <= r['val/dice_fc'] <= 1.0 for r in rows if 'val/dice_fc' in r)
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  assert mngr.latest_step() == int(state.step) == config.train.num_steps
  val = {r['step']: r['val/dice_mean'] for r in rows if 'val/dice_mean' in r}
  assert mngr.best_step() in mngr.all_steps() and val[mngr.best_step()] == max(val.values())
  assert mngr.metrics(6)['val/dice_mean'] == pytest.approx(val[6])
  saved = json.loads((workdir / 'checkpoints' / '6' / 'config' / 'metadata').read_text())
  assert saved['model']['features'] == list(config.model.features)


def test_workdir_of_another_model_refuses_to_mix_checkpoints(straight_run):
  config, workdir, _ = straight_run
  other = config.copy_and_resolve_references()
  other.model.features = (8, 16, 32, 64, 128)
  with pytest.raises(ValueError, match=r'was trained with model .*features=\(4, 8, 16, 32, 64\).* asks for '
                     r'.*features=\(8, 16, 32, 64, 128\)'):
    train.train_and_evaluate(other, workdir)
  starts = [json.loads(line) for line in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert [s['config']['model']['features'] for s in starts] == [[4, 8, 16, 32, 64]]


def test_finished_run_is_not_trained_again(straight_run):
  config, workdir, _ = straight_run
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert train.train_and_evaluate(config, workdir) is None
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
  config = _config(tmp_path / 'phantom')
  put_on_mesh = pipeline.put_on_mesh

  def nan_images(batch, sharding, **kwargs):
    return put_on_mesh({**batch, 'image': np.full_like(batch['image'], np.nan)}, sharding, **kwargs)

  monkeypatch.setattr(pipeline, 'put_on_mesh', nan_images)
  with pytest.raises(FloatingPointError, match='at step 1'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert checkpoints.manager(tmp_path / 'run', 2).latest_step() is None
