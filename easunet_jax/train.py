"""Training: the train state, jitted train and validation steps over a ('data',) mesh, and the loop."""

import contextlib
import datetime
import functools
import importlib.metadata
import json
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

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
from jax.experimental import multihost_utils
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
class FirstNonFinite(clu_metrics.Metric):
  """The first step whose loss or gradients were not finite; 0 when there was none."""
  step: jax.Array

  @classmethod
  def from_model_output(cls, *, step: jax.Array, nonfinite: jax.Array, **_) -> 'FirstNonFinite':
    return cls(step=jnp.where(nonfinite, step, 0))

  def merge(self, other: 'FirstNonFinite') -> 'FirstNonFinite':  # self holds the earlier steps
    return type(self)(step=jnp.where(self.step > 0, self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class SkippedSteps(clu_metrics.Metric):
  """How many steps left the state unchanged because their loss or gradients were not finite."""
  count: jax.Array

  @classmethod
  def from_model_output(cls, *, nonfinite: jax.Array, **_) -> 'SkippedSteps':
    return cls(count=nonfinite.astype(jnp.int32))

  def merge(self, other: 'SkippedSteps') -> 'SkippedSteps':
    return type(self)(count=self.count + other.count)

  def compute(self) -> jax.Array:
    return self.count


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Accumulated on the devices between logging steps; the losses average the finite steps only."""
  loss: clu_metrics.Average.from_output('loss')
  loss_final: clu_metrics.Average.from_output('loss_final')
  skipped_steps: SkippedSteps
  first_nonfinite_step: FirstNonFinite


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


def model_loss(model: nnx.Module, batch: dict[str, jax.Array], loss_cfg: ml_collections.ConfigDict
               ) -> tuple[jax.Array, jax.Array]:
  """(total, final output's) loss of a training-mode model on a batch."""
  final, sides = model(batch['image'])
  return losses.deep_supervision_loss(final, sides, batch['label'], tuple(loss_cfg.side_weights),
                                      loss_cfg.dice_eps)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict
               ) -> tuple[TrainState, TrainMetrics]:
  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    total, loss_final = model_loss(model, batch, loss_cfg)
    return total, (loss_final, nnx.state(model, nnx.BatchStat))

  (loss, (loss_final, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # One scalar for all gradients: a per-leaf isfinite().all() is fused by XLA into every parameter update
  # and tripled the train step's compile time on CPU. A norm that overflows float32 counts as non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updated = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                          opt_state=opt_state)
  # A step with a non-finite loss or gradient changes nothing but the step count: train.nan_policy 'skip'
  # goes on from the last finite state, and 'stop' never has a non-finite state to save.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  new_state = new_state.replace(step=state.step + 1)
  # Per-step outputs of shape (1,), so that clu applies the mask to them.
  return new_state, TrainMetrics.single_from_model_output(
      loss=loss[None], loss_final=loss_final[None], mask=finite[None], step=new_state.step,
      nonfinite=~finite)


def trace_model_loss(config: ml_collections.ConfigDict, image_HW: tuple[int, int]) -> None:
  """Builds the model and its loss on shapes alone, compiling nothing (a few times faster than tracing the
  whole step): raises at start-up what the model, the loss or the optimiser would raise for `config` at
  the first step (widths, switches, side outputs)."""
  make_optimizer(config.optim, num_steps=1)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(config.seed))))
  batch = {'image': jax.ShapeDtypeStruct((1, *image_HW, 1), jnp.float32),
           'label': jax.ShapeDtypeStruct((1, *image_HW), jnp.int32)}
  jax.eval_shape(lambda p, b: model_loss(nnx.merge(graphdef, p), b, config.loss), params, batch)


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


def prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """preprocess.prepare_data, run by process 0 first while the other processes wait: builders running
  at once would delete each other's half-built stores. The others then find the store up to date on a
  shared disk (or build their own copy on a local one)."""
  if jax.process_index() > 0:
    multihost_utils.sync_global_devices('slice store built')
  store_dir = preprocess.prepare_data(config, workdir)
  if jax.process_index() == 0:
    multihost_utils.sync_global_devices('slice store built')
  return store_dir


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], str | None]]:
  """While open, SIGTERM and SIGINT only ask the loop to save and stop after the step in flight; the
  callable yields the signal's name once one came. A second signal acts as usual (kills)."""
  received = []

  def request_stop(signum, frame) -> None:
    received.append(signal.Signals(signum).name)
    signal.signal(signum, previous[signum])

  previous = {}
  # With several processes JAX's preemption service owns SIGTERM and picks a step that all of them
  # reach (CheckpointManager.reached_preemption); a handler here would take the signal from it.
  if jax.process_count() == 1:
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda: received[0] if received else None
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def code_version() -> str:
  """`git describe` of the package's checkout, else the installed package's version."""
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty', '--tags'], capture_output=True,
                          text=True, check=True, timeout=30, cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    try:
      return importlib.metadata.version('easunet_jax')
    except importlib.metadata.PackageNotFoundError:
      return 'unknown (neither a git checkout nor an installed package)'


def _record_start(workdir: pathlib.Path, config: ml_collections.ConfigDict, start: int) -> None:
  """Appends this start's config, code version and command to `<workdir>/runs.jsonl`."""
  if jax.process_index() > 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
            'start_step': start, 'code_version': code_version(), 'command': sys.argv,
            'jax': jax.__version__, 'devices': jax.device_count(), 'config': config.to_dict()}
  with open(workdir / 'runs.jsonl', 'a') as f:
    f.write(json.dumps(record) + '\n')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> TrainState | None:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  SIGTERM or SIGINT saves a checkpoint after the step in flight and returns. Returns the last state, or
  None when the workdir holds a finished run (nothing is trained again).
  """
  workdir = pathlib.Path(workdir)
  batch_size = config.train.batch_size
  eval_batch_size = -(-config.eval.batch_size // jax.device_count()) * jax.device_count()
  mngr = checkpoints.manager(workdir, config.checkpoint.keep, for_training=True)
  start = mngr.latest_step() or 0
  if start:  # before anything slow: a workdir of another network is refused at once
    checkpoints.check_same_model(checkpoints.saved_config(mngr, start), config.model,
                                 mngr.directory / str(start))

  store_dir = prepare_data(config, workdir)
  train_slices = len(pipeline.SliceSource(store_dir / 'train'))
  num_steps = config.train.num_steps or config.train.num_epochs * train_slices // batch_size
  if num_steps <= 0:
    raise ValueError(f'{train_slices} training slices give no full batch of {batch_size}')
  if start >= num_steps:
    logging.info('Training in %s already finished at step %d of %d; nothing to do.', workdir, start,
                 num_steps)
    mngr.close()
    return None
  _record_start(workdir, config, start)

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

  def next_batch() -> tuple[dict[str, jax.Array], dict]:
    """The next batch, sent to the devices, and the iterator's state after it (what a checkpoint saves)."""
    batch = pipeline.put_on_mesh(next(train_iter), data_sharding, per_process=True)
    return batch, train_iter.get_state()

  writer = logging_utils.MetricWriter(workdir, start)
  progress = logging_utils.Progress(start, num_steps)
  accumulated = None
  batch, next_iter_state = next_batch()
  with _stop_requests() as stop_signal:
    for step in range(start + 1, num_steps + 1):
      state, step_metrics = p_train_step(state, batch)
      iter_state = next_iter_state
      if step < num_steps:  # loaded and sent while the step runs
        batch, next_iter_state = next_batch()
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)

      stop = stop_signal() or (mngr.reached_preemption(step) and 'preemption')
      is_log = step % config.log.every_steps == 0 or step == num_steps
      is_eval = step % config.train.eval_every_steps == 0 or step == num_steps
      is_save = is_eval or step % config.checkpoint.every_steps == 0 or stop
      if not (is_log or is_save):
        continue  # no host sync on the other steps: the device runs ahead
      summary = jax.device_get(accumulated.compute())
      if summary['first_nonfinite_step'] and config.train.nan_policy == 'stop':
        last = mngr.latest_step()
        raise FloatingPointError(
            f'non-finite loss or gradients at step {summary["first_nonfinite_step"]} (found at step '
            f'{step}); stopped without saving (train.nan_policy=stop), the last good checkpoint is '
            f'{mngr.directory / str(last) if last else "none"}. Lower optim.lr, check the data, or set '
            'train.nan_policy=skip')
      if is_log:
        # A period whose steps were all skipped has no loss to average: its row leaves the losses out.
        scalars = {f'train/{k}': float(summary[k]) for k in ('loss', 'loss_final', 'skipped_steps')
                   if np.isfinite(summary[k])}
        scalars['train/lr'] = float(lr_fn(step - 1))
        scalars['train/steps_per_s'] = progress.rate(step)
        writer.write_scalars(step, scalars)
        logging.info('%s', progress.line(step, summary['loss'], scalars['train/steps_per_s']))
        if summary['skipped_steps']:
          logging.warning('%d step(s) up to step %d skipped for a non-finite loss or gradient '
                          '(train.nan_policy=skip)', summary['skipped_steps'], step)
        accumulated = None
      if is_save:
        val = validate(p_eval_step, state, store_dir, eval_batch_size, data_sharding) if is_eval else None
        if val:
          writer.write_scalars(step, val)
          logging.info('step %d: val loss %.4f, Dice FC %.4f TC %.4f', step, val['val/loss'],
                       val['val/dice_fc'], val['val/dice_tc'])
        checkpoints.save(mngr, step, state, iter_state, config,
                         {k: float(v) for k, v in val.items()} if val else None)
      if stop:
        logging.warning('Stopped by %s at step %d of %d; checkpoint saved in %s. Run the same command '
                        'to resume.', stop, step, num_steps, mngr.directory / str(step))
        break
  writer.close()
  mngr.close()
  return state
