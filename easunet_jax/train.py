"""The training loop: data, the jitted steps, validation, logging, checkpoints, resume and stop signals."""

import contextlib
import fcntl
import gc
import logging as python_logging
import os
import pathlib
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import parameter_overview
from flax import nnx
from jax.sharding import NamedSharding

from configs import default
from easunet_jax import (
  atomic,
  checkpoints,
  figures,
  losses,
  metric_writer,
  metrics,
  parallel,
  pretrained,
  records,
  steps,
)
from easunet_jax.data import pipeline, preprocess
from easunet_jax.errors import CheckpointError, ConfigError, DataError, UserError, one_line
from easunet_jax.progress import EVERY_S, Progress

# train.nan_policy='skip' gives up after this many skipped steps in a row (whole logging periods counted):
# a model whose every update is refused has diverged, or every batch holds a bad slice, and would finish
# as if trained.
MAX_SKIPPED_IN_A_ROW = 100
# loss_curves.png is redrawn at a validation this long after it was last drawn, and at the run's end or
# stop: a figure takes a few tenths of a second, nothing beside a long run's validations, much beside a
# test's.
CURVES_EVERY_S = 60.0


class Stopped(Exception):
  """Training saved a checkpoint and stopped before its last step, at a signal (or a preemption): resumable
  by the same command, and not finished, so `main.py` exits as a shell reports the signal (128 + its
  number), and a script or a sweep does not go on to evaluate it."""

  def __init__(self, cause: str):
    super().__init__(cause)
    self.exit_code = 128 + getattr(signal, cause, signal.SIGTERM)  # a preemption comes as a SIGTERM


def validate(p_eval_step: Callable, state: steps.TrainState, val: pipeline.Split, batch_size: int,
             data_sharding: NamedSharding, dice_eps: float) -> dict[str, float]:
  """The loss of the validation set as one batch (whatever eval.batch_size and the device count: the
  curves of a laptop's run and of a cluster's compare) and the mean over validation volumes of their 3D
  Dice (FC, TC)."""
  cases = [row['case'] for row in val.index]
  per_case: dict[str, np.ndarray] = {}
  loss_sums, row = None, 0
  progress = Progress(len(cases))  # a study's validation set takes minutes on a CPU
  for batch in pipeline.eval_batches(val, batch_size):
    out = jax.device_get(p_eval_step(state, pipeline.put_on_mesh(batch, data_sharding)))
    sums = jax.tree.map(lambda x: np.asarray(x, np.float64), out['loss_sums'])
    loss_sums = sums if loss_sums is None else jax.tree.map(np.add, loss_sums, sums)
    for counts in out['counts'][:int(out['num_valid'])]:
      per_case[cases[row]] = per_case.get(cases[row], 0) + counts
      row += 1
    progress.update(row)
    if progress.due(EVERY_S):
      logging.info('%s', progress.status('validation slices'))
  dice = metrics.dice_from_counts(np.stack(list(per_case.values())).astype(np.float64)).mean(axis=0)
  return {'val/loss': float(losses.loss_of_sums(loss_sums, dice_eps)), 'val/dice_fc': dice[0],
          'val/dice_tc': dice[1], 'val/dice_mean': dice.mean()}


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], str | None]]:
  """While open, SIGTERM and SIGINT only ask the loop to save and stop after the step in flight; the
  callable yields the first signal's name once one came. A second Ctrl-C acts as usual (kills); a second
  SIGTERM changes nothing, as the save it would cut short is what the first asked for: on Linux the death
  of a sweep by SIGKILL may reach each of its points more than once, as each thread of the sweep that
  started it ends (PR_SET_PDEATHSIG, `sweep.launch`)."""
  received = []

  def request_stop(signum, frame) -> None:
    received.append(signal.Signals(signum).name)
    if signum == signal.SIGINT:
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


@contextlib.contextmanager
def _sole_training(workdir: pathlib.Path) -> Iterator[None]:
  """Held while `workdir` trains (by process 0): a second training of it (a job submitted twice, a sweep
  started again while its points still run) is refused instead of writing the same checkpoints."""
  if jax.process_index() > 0:
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / '.training.lock', 'a+') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      raise CheckpointError(f'{workdir}: another training of this workdir is running '
                            f'({lock.read().strip()}); stop it first, or train in another workdir') from None
    except OSError as e:  # a file system without locks: train unguarded
      logging.warning('%s: cannot lock the workdir (%s); nothing stops a second training of it', workdir, e)
    lock.seek(0)
    lock.truncate()
    lock.write(f'process {os.getpid()} on {socket.gethostname()}')
    lock.flush()
    atomic.remove_left_by_dead(workdir)  # what a killed training left half-written (metrics.jsonl's rewrite)
    yield  # closing the file releases the lock, also when the process dies


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> steps.TrainState | None:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; one training per workdir at a time.

  SIGTERM or SIGINT saves a checkpoint after the step in flight and raises `Stopped`. Returns the last
  state, or None when the workdir holds a finished run (nothing is trained again).
  """
  workdir = pathlib.Path(workdir)
  # Closed however training ends (an error too): a save still in flight is finished, not lost.
  with _sole_training(workdir), _logged_to(workdir / 'train.log'), contextlib.closing(
      checkpoints.manager(workdir, config.checkpoint.keep, for_training=True)) as mngr:
    return _train(config, workdir, mngr)


class _LogFile(python_logging.FileHandler):
  """A log file that a full disk or a lost mount stops quietly: the run's own writes report it in one line,
  where the logging module would print its traceback at every line."""

  def handleError(self, record: python_logging.LogRecord) -> None:
    del record


@contextlib.contextmanager
def _logged_to(path: pathlib.Path) -> Iterator[None]:
  """Copies process 0's log into `path` as the terminal shows it, each start of the run appending, and the
  error that ends the run: a user's in its one line, any other with its traceback. A run's account outlives
  the terminal it was started in."""
  if jax.process_index() > 0:  # process 0 speaks for all
    yield
    return
  handler = _LogFile(path, encoding='utf-8', errors='backslashreplace')
  handler.setFormatter(logging.PythonFormatter())
  handler.addFilter(checkpoints.quiet_libraries)
  python_logging.root.addHandler(handler)  # beside absl's own: the standard logging's records too
  try:
    yield
  except Stopped:  # logged where it saved, and how to resume
    raise
  except Exception as e:
    user, raised_at = isinstance(e, UserError), traceback.extract_tb(e.__traceback__)[-1]
    handler.handle(python_logging.root.makeRecord(
        'absl', python_logging.ERROR, raised_at.filename, raised_at.lineno,
        f'error: {one_line(e)}' if user else 'ended by an error', None, None if user else sys.exc_info()))
    raise
  finally:
    python_logging.root.removeHandler(handler)
    handler.close()


def _compile_and_size(train_step: Callable, state: steps.TrainState, batch: dict[str, jax.Array],
                      mesh: jax.sharding.Mesh) -> None:
  """Compiles the jitted `train_step` for `state` and `batch` (jit keeps the program for its first call,
  which only traces it again: 1.3 s for the demo) and logs the memory it asks for beyond its arguments, as a
  warning where that exceeds what a device has free: the run would end part way, on a CPU without a
  message (Linux's out-of-memory killer prints none). The step is called as jitted, not as the compiled
  object, whose calls took 0.3-0.4 of the demo's 3.2 steps/s."""
  analysis, device = train_step.lower(state, batch).compile().memory_analysis(), mesh.local_devices[0]
  if analysis is None:
    return
  need = analysis.temp_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  where = f'{device.platform.upper()} {device.id}'
  if device.platform == 'cpu':  # the host's CPU devices run their programs side by side, in its memory
    need, where = need * len(mesh.local_devices), 'this machine'
  free = parallel.memory_free(device)
  if free is None or need <= free:
    logging.info('a training step asks for %.3g GB of memory beyond the model%s', need / 1e9,
                 '' if free is None else f' ({where} has {free / 1e9:.3g} GB free)')
  else:
    logging.warning('a training step asks for %.3g GB of memory beyond the model and %s has %.3g GB free: '
                    'the run may end for want of memory (on a CPU without a message but "Killed"); lower '
                    'train.batch_size (now %d)', need / 1e9, where, free / 1e9, len(batch['label']))


def _draw_curves(workdir: pathlib.Path) -> None:
  """<workdir>/loss_curves.png of metrics.jsonl so far (process 0): a long run's course at a glance, in a
  file browser too, as nnU-Net's progress.png."""
  if jax.process_index() > 0:
    return
  try:
    with atomic.replaced(workdir / 'loss_curves.png') as tmp:
      figures.plot_loss_curves(metric_writer.read_rows(workdir / 'metrics.jsonl'), tmp)
  except OSError as e:  # a full disk: the next checkpoint's save says so; a figure is no reason to stop
    logging.warning('%s not drawn: %s', workdir / 'loss_curves.png', e.strerror or e)


def _divergence_advice(mngr: ocp.CheckpointManager) -> str:
  """The end of the errors that stop a diverged run: its newest checkpoint and what to do."""
  last = mngr.latest_step()
  if not last:
    return 'the run has no checkpoint yet. Lower optim.lr or check the data'
  # A run resumed here starts from that checkpoint's weights, which may be diverging already.
  return (f'the last checkpoint is {mngr.directory / str(last)}. Train again in a new --workdir with a lower '
          'optim.lr (a run resumed here starts from that checkpoint) or check the data')


def _warn_if_the_schedule_jumps(saved: dict, config: ml_collections.ConfigDict, start: int, num_steps: int,
                                train_slices: int) -> None:
  """A warning where a run resumed at `start` takes another learning rate there than the config it was
  saved with gives (`saved`; steps by num_epochs counted on today's `train_slices`): a finished run given
  more train.num_steps under the poly schedule would decay again from a rate far above the one it ended
  at, not go on from there."""
  fields = default.get_config()
  trained = {**fields.train.to_dict(), **saved.get('train', {})}
  trained_optim = ml_collections.ConfigDict({**fields.optim.to_dict(), **saved.get('optim', {})})
  trained_steps = trained['num_steps'] or trained['num_epochs'] * train_slices // trained['batch_size']
  was = float(steps.learning_rate_schedule(trained_optim, trained_steps)(start))
  now = float(steps.learning_rate_schedule(config.optim, num_steps)(start))
  if not np.isclose(was, now, rtol=1e-5, atol=0.0):
    logging.warning(
        'resuming at step %d with a learning rate of %.3g, where the config it was saved with gives %.3g '
        '(%d steps, optim.lr %g, optim.schedule %r; now %d, %g, %r): the schedule jumps; to train a finished '
        'run further, export it (--mode=export) and start another workdir from it '
        '(--config.train.init_weights) with the learning rate to go on at (--config.optim.lr)', start, now,
        was, trained_steps, trained_optim.lr, trained_optim.schedule, num_steps, config.optim.lr,
        config.optim.schedule)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, mngr: ocp.CheckpointManager
           ) -> steps.TrainState | None:
  batch_size = config.train.batch_size
  start = mngr.latest_step() or 0
  parallel.check_same_step(workdir, start, 'resuming from')
  mesh = parallel.make_mesh()
  # Before anything slow: a workdir or a model file of another network is refused at once.
  if start:
    with checkpoints.unreadable_to_resume(mngr, start):
      saved = checkpoints.saved_config(mngr, start)
    checkpoints.check_same_model(saved, config.model, mngr.directory / str(start), instead='another workdir')
    checkpoints.check_same_split(saved, config, mngr.directory / str(start))
    checkpoints.check_same_label_map(saved, config, mngr.directory / str(start))
  elif config.train.init_weights:  # checked here, not at the start: a resumed run ignores it, moved or not
    if not pathlib.Path(config.train.init_weights).is_file():
      raise ConfigError(f'train.init_weights: expected a model file (--mode=export), got '
                        f'{config.train.init_weights!r}, which is not a file')
    init_step, _, initial = pretrained.load(config, config.train.init_weights, mesh)

  # Process 0 builds the store while the others wait: builders running at once would delete each other's
  # half-built stores. The others then find it up to date on a shared disk, or build their own copy.
  with parallel.process_0_first('slice store built'):
    store_dir = preprocess.prepare_data(config, workdir, as_trained=bool(start))
    # Mapped at once: a store that another run on the same data.cache_dir renames into its place later
    # leaves them as they are, and is told (`is_current`) before the first step.
    train_source = pipeline.SliceSource(store_dir / 'train')
    val_split = pipeline.read_split(store_dir, 'val')
  train_slices = len(train_source)
  for split, slices in (('training', train_slices), ('validation', len(val_split.index))):
    if not slices:  # validation picks the best checkpoint, and would fail only at its first round
      raise DataError(f'{store_dir}: no {split} slices (data.split or data.split_file gives that split no '
                      'case, or its cases were skipped)')
  pipeline.warn_of_absent_classes(val_split, 'validation')
  # A batch larger than the training set would hold its slices several times over.
  if train_slices < batch_size:
    raise DataError(f'{train_slices} training slices give no full batch of train.batch_size {batch_size}')
  num_steps = config.train.num_steps or config.train.num_epochs * train_slices // batch_size
  if start >= num_steps:
    logging.info('Training in %s already finished at step %d of %d; nothing to do.', workdir, start,
                 num_steps)
    return None
  # What it trains on: a resumed run on the cases it started with (or an older workdir, from now on).
  try:
    if not (start and pipeline.check_trained_on(workdir, store_dir)) and jax.process_index() == 0:
      pipeline.record_trained_on(workdir, store_dir)
  finally:  # a store rebuilt meanwhile is named as such, also where the check took it for another split
    pipeline.check_not_rebuilt(train_source, store_dir)
  if start:  # after the checks of its cases: a run refused for another split is not warned of first
    _warn_if_the_schedule_jumps(saved, config, start, num_steps, train_slices)
  records.record_start(workdir, config, start)

  tx = steps.make_optimizer(config.optim, num_steps)
  data_sharding, replicated = parallel.shardings(mesh)
  eval_batch_size = parallel.round_to_devices(config.eval.batch_size, mesh)
  train_graphdef, eval_graphdef = steps.graphdefs(config)
  if start:
    abstract = steps.abstract_state(config, tx, replicated)
    with checkpoints.unreadable_to_resume(mngr, start):
      state = checkpoints.restore(mngr, start, abstract)
    logging.info('Resumed from %s at step %d.', mngr.directory / str(start), start)
  else:
    state = steps.init_state(config, tx, replicated)
    if config.train.init_weights:
      state = state.replace(params=initial.params, batch_stats=initial.batch_stats)
      logging.info('Weights and batch statistics from %s (its step %d).', config.train.init_weights,
                   init_step)
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        nnx.to_pure_dict(state.params)))
  logging.info('Training %s for %d steps (%d training slices, batch %d, %d devices).',
               config.model.name, num_steps, train_slices, batch_size, jax.device_count())

  p_train_step, p_eval_step = steps.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  lr_fn = steps.learning_rate_schedule(config.optim, num_steps)

  def next_batch() -> dict[str, jax.Array]:
    return pipeline.put_on_mesh(next(train_iter), data_sharding, per_process=True)

  writer = metric_writer.MetricWriter(workdir, start)
  progress = Progress(num_steps, done=start)
  accumulated, last_log_step, skipped_in_a_row, drawn_at = None, start, 0, time.monotonic()
  # Worker processes (data.workers) start with the first batch, and keep the SIGINT ignored here (spawned
  # processes do): a terminal's Ctrl-C reaches its whole process group, and only this process is to stop.
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    train_iter = pipeline.train_iterator(train_source, batch_size, config.seed, config.data.workers, start)
    batch = next_batch()
  finally:
    signal.signal(signal.SIGINT, previous)
  with _stop_requests() as stop_signal:
    # Compiled under the stop requests: a stop that comes while it compiles (minutes of the paper's network)
    # saves after the first step, as one during any step does.
    _compile_and_size(p_train_step, state, batch, mesh)
    for step in range(start + 1, num_steps + 1):
      state, step_metrics = p_train_step(state, batch)
      if step < num_steps and not stop_signal():  # loaded and sent while the step runs
        batch = next_batch()
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)

      stop = stop_signal() or (mngr.reached_preemption(step) and 'preemption')
      # A stop logs the steps since the last row: their losses would be lost, and a resumed run starts
      # its first period after the stop.
      is_log = step % config.log.every_steps == 0 or step == num_steps or bool(stop)
      is_eval = step % config.train.eval_every_steps == 0 or step == num_steps
      is_save = is_eval or step % config.checkpoint.every_steps == 0 or stop
      if not (is_log or is_save):
        if progress.due(EVERY_S):  # steps of a minute (the paper's network on a CPU): no silence till a log
          jax.block_until_ready(state.step)
          progress.update(step)
          logging.info('%s', progress.status('step'))
        continue  # no other host sync on these steps: the device runs ahead
      summary = jax.device_get(accumulated.compute())
      if summary['first_nonfinite_step'] and config.train.nan_policy == 'stop':
        raise UserError(
            f'non-finite loss or gradients at step {summary["first_nonfinite_step"]} (found at step '
            f'{step}); stopped without saving (train.nan_policy=stop; train.nan_policy=skip skips such '
            f'steps), {_divergence_advice(mngr)}')
      if is_log:
        progress.update(step)
        # A period whose steps were all skipped has no loss to average: its row leaves the losses out.
        scalars = {f'train/{k}': float(summary[k]) for k in ('loss', 'loss_final', 'skipped_steps')
                   if np.isfinite(summary[k])}
        scalars['train/lr'] = float(lr_fn(step - 1))
        scalars['train/steps_per_s'] = progress.rate()
        writer.write_scalars(step, scalars)
        logging.info('%s  loss %.4f  %.2f steps/s', progress.status('step'), summary['loss'],
                     scalars['train/steps_per_s'])
        if summary['skipped_steps']:
          logging.warning('%d step(s) up to step %d skipped for a non-finite loss or gradient '
                          '(train.nan_policy=skip)', summary['skipped_steps'], step)
        all_skipped = summary['skipped_steps'] == step - last_log_step
        skipped_in_a_row = skipped_in_a_row + step - last_log_step if all_skipped else 0
        if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
          raise UserError(
              f'the last {skipped_in_a_row} steps (to step {step}) were all skipped for a non-finite loss or '
              f'gradients (train.nan_policy=skip): the model no longer trains; {_divergence_advice(mngr)}')
        accumulated, last_log_step = None, step
      if is_save:
        with progress.paused():  # train/steps_per_s is of the training steps alone
          val = (validate(p_eval_step, state, val_split, eval_batch_size, data_sharding, config.loss.dice_eps)
                 if is_eval else None)
          if val and not np.isfinite(val['val/loss']):  # whatever train.nan_policy: skipping steps cannot
            # mend weights whose outputs are no longer finite
            raise UserError(f'the validation loss at step {step} is not finite: the network\'s outputs on '
                            f'the validation slices are NaN or infinite; stopped without saving, '
                            f'{_divergence_advice(mngr)}')
          if val:
            writer.write_scalars(step, val)
            logging.info('step %d: val loss %.4f, Dice FC %.4f TC %.4f', step, val['val/loss'],
                         val['val/dice_fc'], val['val/dice_tc'])
          checkpoints.save(mngr, step, state, config,
                           {k: float(v) for k, v in val.items()} if val else None)
          if step == num_steps or stop or (val and time.monotonic() - drawn_at >= CURVES_EVERY_S):
            _draw_curves(workdir)
            drawn_at = time.monotonic()
      if stop:
        logging.warning('Stopped by %s at step %d of %d; checkpoint saved in %s. Run the same command '
                        'to resume.', stop, step, num_steps, mngr.directory / str(step))
        break
  writer.close()
  # JAX hands a batch it read in place back only at a garbage collection: with data.workers, the last one
  # would keep its Grain shared memory to the process's end, where Python warns of it as leaked.
  del batch
  gc.collect()
  if stop:
    raise Stopped(stop)
  logging.info('training finished at step %d: checkpoints in %s, the best by validation Dice at step %s; '
               'score it on the test split with the same command and --mode=evaluate', num_steps,
               mngr.directory, mngr.best_step())
  return state
