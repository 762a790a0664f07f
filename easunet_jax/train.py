"""Training: the train state, jitted train and validation steps over a ('data',) mesh, and the loop."""

import functools
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from easunet_jax import checkpoints, logging_utils, losses, metrics
from easunet_jax.data import pipeline, preprocess
from easunet_jax.models import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output('loss')
  loss_final: clu_metrics.Average.from_output('loss_final')


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(optim_cfg.lr)
  if optim_cfg.schedule == 'poly':  # nnU-Net's: lr * (1 - step / num_steps) ** 0.9, every step
    return optax.polynomial_schedule(optim_cfg.lr, 0.0, power=0.9, transition_steps=num_steps)
  raise ValueError(f"optim.schedule must be 'constant' or 'poly', got {optim_cfg.schedule!r}")


def make_optimizer(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """PyTorch SGD(lr, momentum, weight_decay): the decay joins the gradient before momentum."""
  return optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay),
      optax.sgd(learning_rate_schedule(optim_cfg, num_steps), momentum=optim_cfg.momentum))


def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       sharding: jax.sharding.Sharding | None = None
                       ) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
  """(training graphdef, evaluation graphdef, state) of a freshly initialised model.

  The initialisation runs as one jitted program: eagerly, every parameter shape compiles its own
  initialiser, which takes several times longer on CPU.
  """
  def init() -> TrainState:
    _, params, batch_stats = nnx.split(build_model(config.model, nnx.Rngs(config.seed)),
                                       nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))

  model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(config.seed)))
  model.train()
  train_graphdef = nnx.graphdef(model)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return train_graphdef, eval_graphdef, jax.jit(init, out_shardings=sharding)()


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict
               ) -> tuple[TrainState, TrainMetrics]:
  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    final, sides = model(batch['image'])
    total, loss_final = losses.deep_supervision_loss(
        final, sides, batch['label'], tuple(loss_cfg.side_weights), loss_cfg.dice_eps)
    return total, (loss_final, nnx.state(model, nnx.BatchStat))

  (loss, (loss_final, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, TrainMetrics.single_from_model_output(loss=loss, loss_final=loss_final)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              num_classes: int, dice_eps: float) -> dict[str, jax.Array]:
  """Per-sample confusion counts (B, K-1, 3) = (TP, FP, FN) of each foreground class, and the loss."""
  logits = nnx.merge(graphdef, state.params, state.batch_stats)(batch['image'])
  label = batch['label']
  counts = metrics.confusion_counts(jnp.argmax(logits, axis=-1), label, num_classes)
  loss = losses.segmentation_loss(logits, label, dice_eps, valid_B=batch['mask'])
  return {'counts': counts, 'loss': loss, 'num_valid': jnp.sum(batch['mask'])}


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all): batches split along it, state replicated."""
  devices = devices or jax.devices()
  return jax.make_mesh((len(devices),), ('data',), axis_types=(AxisType.Auto,), devices=devices)


def jit_steps(config: ml_collections.ConfigDict, train_graphdef: nnx.GraphDef, eval_graphdef: nnx.GraphDef,
              tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """The train step (state donated) and eval step, compiled for batches sharded over `mesh`."""
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  p_train_step = jax.jit(
      functools.partial(train_step, graphdef=train_graphdef, tx=tx, loss_cfg=config.loss),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  p_eval_step = jax.jit(
      functools.partial(eval_step, graphdef=eval_graphdef, num_classes=config.model.num_classes,
                        dice_eps=config.loss.dice_eps),
      in_shardings=(replicated, data_sharding), out_shardings=replicated)
  return p_train_step, p_eval_step


def validate(p_eval_step, state: TrainState, store_dir: pathlib.Path, batch_size: int,
             data_sharding: NamedSharding) -> dict[str, float]:
  """Validation loss and the mean over validation volumes of their 3D Dice (FC, TC)."""
  cases = [row['case'] for row in pipeline.read_index(store_dir / 'val')]
  per_case: dict[str, np.ndarray] = {}
  loss_sum, row = 0.0, 0
  for batch in pipeline.eval_batches(store_dir, batch_size, split='val'):
    out = jax.device_get(p_eval_step(state, pipeline.put_on_mesh(batch, data_sharding)))
    n = int(out['num_valid'])
    loss_sum += float(out['loss']) * n
    for counts in out['counts'][:n]:
      per_case[cases[row]] = per_case.get(cases[row], 0) + counts
      row += 1
  dice = metrics.dice_from_counts(np.stack(list(per_case.values())).astype(np.float64)).mean(axis=0)
  return {'val/loss': loss_sum / row, 'val/dice_fc': dice[0], 'val/dice_tc': dice[1],
          'val/dice_mean': dice.mean()}


def _check_finite(loss: float, step: int) -> None:
  if not np.isfinite(loss):
    raise FloatingPointError(f'loss is {loss} at step {step}; stopping (the last good checkpoint is '
                             'kept). Lower optim.lr or check the data.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> TrainState | None:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Returns the final state, or None when the workdir holds a finished run (nothing is trained again).
  """
  workdir = pathlib.Path(workdir)
  batch_size = config.train.batch_size
  if batch_size % jax.device_count():
    raise ValueError(f'train.batch_size {batch_size} must divide by the device count '
                     f'{jax.device_count()}')
  eval_batch_size = -(-config.eval.batch_size // jax.device_count()) * jax.device_count()

  store_dir = preprocess.prepare_data(config, workdir)
  train_slices = len(pipeline.SliceSource(store_dir / 'train'))
  num_steps = config.train.num_steps or config.train.num_epochs * train_slices // batch_size
  if num_steps <= 0:
    raise ValueError(f'{train_slices} training slices give no full batch of {batch_size}')

  mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  start = mngr.latest_step() or 0
  if start >= num_steps:
    logging.info('Training in %s already finished at step %d of %d; nothing to do.', workdir, start,
                 num_steps)
    mngr.close()
    return None

  tx = make_optimizer(config.optim, num_steps)
  mesh = make_mesh()
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  train_graphdef, eval_graphdef, state = create_train_state(config, tx, replicated)
  train_iter = pipeline.train_iterator(store_dir, batch_size, config.seed, config.data.augment,
                                       config.data.workers)
  if start:
    state, iter_state = checkpoints.restore(mngr, start, state)
    train_iter.set_state(iter_state)
    logging.info('Resumed from %s at step %d.', mngr.directory / str(start), start)
  else:
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        state.params.to_pure_dict()))
  logging.info('Training %s for %d steps (%d training slices, batch %d, %d devices).',
               config.model.name, num_steps, train_slices, batch_size, jax.device_count())

  p_train_step, p_eval_step = jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  lr_fn = learning_rate_schedule(config.optim, num_steps)

  writer = logging_utils.MetricWriter(workdir, start)
  progress = logging_utils.Progress(start, num_steps)
  accumulated = None
  for step in range(start + 1, num_steps + 1):
    batch = pipeline.put_on_mesh(next(train_iter), data_sharding)
    state, step_metrics = p_train_step(state, batch)
    accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)

    if step % config.log.every_steps == 0 or step == num_steps:
      scalars = {f'train/{k}': float(v) for k, v in accumulated.compute().items()}
      _check_finite(scalars['train/loss'], step)
      scalars['train/lr'] = float(lr_fn(step - 1))
      scalars['train/steps_per_s'] = progress.rate(step)
      writer.write_scalars(step, scalars)
      logging.info('%s', progress.line(step, scalars['train/loss'], scalars['train/steps_per_s']))
      accumulated = None

    is_eval = step % config.train.eval_every_steps == 0 or step == num_steps
    if is_eval or step % config.checkpoint.every_steps == 0:
      _check_finite(float(step_metrics.compute()['loss']), step)
      val = validate(p_eval_step, state, store_dir, eval_batch_size, data_sharding) if is_eval else None
      if val:
        writer.write_scalars(step, val)
        logging.info('step %d: val loss %.4f, Dice FC %.4f TC %.4f', step, val['val/loss'],
                     val['val/dice_fc'], val['val/dice_tc'])
      checkpoints.save(mngr, step, state, train_iter.get_state(), config,
                       {k: float(v) for k, v in val.items()} if val else None)
  writer.close()
  mngr.close()
  return state
