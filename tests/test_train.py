"""The training loop: logs and checkpoints, another model's workdir or split, a finished run, a split
without cases, NaN in the data (stop, or skip and count), fine-tuning from a model file. A killed run's
resume is test_main's (a real kill -9)."""

import errno
import fcntl
import gc
import json
import logging
import pathlib
import re
import shutil
import signal
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from grain._src.python.ipc import shared_memory_array

from configs import default, tiny
from easunet_jax import checkpoints, config_check, evaluate, figures, parallel, pretrained, steps, train
from easunet_jax.data import pipeline, preprocess
from easunet_jax.errors import CheckpointError, ConfigError, DataError, UserError


class Killed(Exception):
  """Stops a run part-way: the fine-tuning test needs only its first step."""


def test_metrics_log_and_checkpoints(augmented_tiny):
  config, workdir, state = augmented_tiny
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  keys = set().union(*rows)
  assert {'step', 'train/loss', 'train/loss_final', 'train/lr', 'train/steps_per_s', 'val/loss',
          'val/dice_fc', 'val/dice_tc', 'val/dice_mean'} <= keys
  assert [r['step'] for r in rows if 'val/dice_mean' in r] == [3, 6]
  assert all(0.0 <= r['val/dice_fc'] <= 1.0 for r in rows if 'val/dice_fc' in r)
  # The logged loss adds the side outputs' weighted losses to the final output's (loss_final).
  losses = [(r['train/loss'], r['train/loss_final']) for r in rows if 'train/loss' in r]
  assert len(losses) == config.train.num_steps and all(total > final > 0 for total, final in losses)
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'loss_curves.png').read_bytes().startswith(b'\x89PNG')  # drawn at the end
  mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  assert mngr.latest_step() == int(state.step) == config.train.num_steps
  val = {r['step']: r['val/dice_mean'] for r in rows if 'val/dice_mean' in r}
  assert mngr.best_step() in mngr.all_steps() and val[mngr.best_step()] == max(val.values())
  assert mngr.metrics(6)['val/dice_mean'] == pytest.approx(val[6])
  saved = json.loads((workdir / 'checkpoints' / '6' / 'config' / 'metadata').read_text())
  assert saved['model']['features'] == list(config.model.features)


def test_a_run_off_its_cadences_validates_and_saves_its_last_step(augmented_tiny, tmp_path, monkeypatch,
                                                                   caplog):
  """6 steps: rows every 2, validation every 4 and checkpoints every 5 steps, and all at the last (the
  augmented run's program: compiled once). Each row logs the poly rate of its step's update, lr (1 - (step
  - 1) / 6)^0.9. Steps and validations that take long (here: every time) say how far they are between. A
  step that asks for more memory than the machine has free (here: 1 MB) is warned of before it runs."""
  config = augmented_tiny[0].copy_and_resolve_references()
  config.train.eval_every_steps, config.checkpoint.every_steps, config.log.every_steps = 4, 5, 2
  saved, save = [], checkpoints.save
  monkeypatch.setattr(checkpoints, 'save',
                      lambda mngr, step, *args: (saved.append(step), save(mngr, step, *args)))
  monkeypatch.setattr(train, 'EVERY_S', 0.0)
  monkeypatch.setattr(parallel, 'host_memory_free', lambda: 10**6)
  # loss_curves.png: redrawn at step 4's validation, 61 s (a clock of train's own) after the start, and at
  # the end; not at step 5's save, which has no validation.
  drawn, plot, clock = [], figures.plot_loss_curves, iter([0.0, 61.0, 62.0, 100.0])
  monkeypatch.setattr(train, 'time', types.SimpleNamespace(monotonic=lambda: next(clock)))
  monkeypatch.setattr(figures, 'plot_loss_curves',
                      lambda rows, out: (drawn.append(rows[-1]), plot(rows, out)))
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert [(row['step'], 'val/dice_fc' in row) for row in drawn] == [(4, True), (6, True)]
  [short] = [m for r in caplog.records if 'GB free' in (m := r.getMessage())]
  need = float(re.match(r'a training step asks for (\S+) GB', short)[1])
  assert 0.001 < need < 1 and short.endswith(
      ' GB of memory beyond the model and this machine has 0.001 GB free: the run may end for want of memory '
      f'(on a CPU without a message but "Killed"); lower train.batch_size (now {config.train.batch_size})')
  rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'val/dice_mean' in r] == [4, 6] and saved == [4, 5, 6]
  assert drawn[-1] == rows[-1]
  rates = [(r['step'], r['train/lr']) for r in rows if 'train/lr' in r]
  assert [step for step, _ in rates] == [2, 4, 6]
  assert [lr for _, lr in rates] == pytest.approx([1e-4 * (1 - s / 6) ** 0.9 for s in (1, 3, 5)])
  status = [m for r in caplog.records if ' (spent ' in (m := r.getMessage())]
  assert [re.sub(r' \(spent.*', '', m) for m in status if 'loss' not in m and 'preprocess' not in m] == [
      'step 1/6', 'step 3/6', *(['validation slices 4/8', 'validation slices 8/8'] * 2)]


def test_the_memory_a_training_step_asks_for_is_logged(caplog):
  """XLA's figure for the compiled step, beside what the machine has free (a warning where it is short:
  test_a_run_off_its_cadences_validates_and_saves_its_last_step); the step's first call compiles nothing
  more."""
  mesh = parallel.make_mesh()
  data, replicated = parallel.shardings(mesh)
  step = jax.jit(lambda state, batch: (state + 1, (batch['label'] * 2.0).sum()),
                 in_shardings=(replicated, data), donate_argnums=0)
  state = jax.device_put(np.zeros(3, np.float32), replicated)
  batch = {'label': jax.device_put(np.ones((8, 256, 256), np.float32), data)}
  with caplog.at_level(logging.INFO):
    train._compile_and_size(step, state, batch, mesh)
  [line] = [m for r in caplog.records if 'a training step asks' in (m := r.getMessage())]
  asked, free = map(float, re.fullmatch(r'a training step asks for (\S+) GB of memory beyond the model '
                                        r'\(this machine has (\S+) GB free\)', line).groups())
  assert 0 < asked < 0.1 and free == pytest.approx(parallel.host_memory_free() / 1e9, rel=0.2)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    caplog.clear()
    state, total = step(state, batch)
  assert float(total) == 2 * 8 * 256 * 256 and np.asarray(state).tolist() == [1, 1, 1]
  assert not [r for r in caplog.records if 'Compiling' in r.getMessage()]


def test_a_stop_while_the_step_compiles_saves_after_the_first_step(augmented_tiny, tmp_path, monkeypatch):
  """A SIGTERM (a scheduler's time limit) as the step compiles, which takes minutes for the paper's network:
  saved and stopped after step 1, as main.py's handler, which raises (here: Interrupted), never hears it."""
  class Interrupted(Exception):
    pass

  def interrupted(signum, frame):
    raise Interrupted

  compile_and_size = train._compile_and_size

  def signalled_compile(*args):
    signal.raise_signal(signal.SIGTERM)  # handled before the call returns
    compile_and_size(*args)

  monkeypatch.setattr(train, '_compile_and_size', signalled_compile)
  previous = signal.signal(signal.SIGTERM, interrupted)
  try:
    with pytest.raises(train.Stopped) as stopped:
      train.train_and_evaluate(augmented_tiny[0], tmp_path / 'run')
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert stopped.value.exit_code == 143
  assert checkpoints.manager(tmp_path / 'run', 3).all_steps() == [1]
  # Its curves drawn at the stop, before any validation, and its log kept.
  assert (tmp_path / 'run' / 'loss_curves.png').read_bytes().startswith(b'\x89PNG')
  assert 'Stopped by SIGTERM at step 1 of 6' in (tmp_path / 'run' / 'train.log').read_text()


def test_no_batch_of_the_workers_shared_memory_outlives_a_training(augmented_tiny, tmp_path, monkeypatch):
  """With data.workers, batches come in Grain's shared memory, which a batch unlinks when it is freed; one
  still held as the process ends is warned of by Python as leaked. A training, here stopped by a SIGTERM
  (the path of its last step, and of a stop), holds none."""
  config = augmented_tiny[0].copy_and_resolve_references()
  config.data.workers = 1
  monkeypatch.setattr(train, '_compile_and_size', lambda *args: signal.raise_signal(signal.SIGTERM))
  with pytest.raises(train.Stopped):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not [o for o in gc.get_objects() if isinstance(o, shared_memory_array.SharedMemoryArray)]


def test_validation_sums_the_loss_over_the_batches_and_scores_each_case(monkeypatch):
  """Three validation slices, of cases a, a and b, in batches of two (the second padded): the loss is the
  validation set's as one batch (the batches' sums added, `losses.loss_sums`), and each case's Dice sums its
  slices' counts: FC found wherever it is (Dice 1), TC nowhere (Dice 0)."""
  found_fc = np.array([[5, 0, 0], [0, 0, 5]])  # (TP, FP, FN) of FC and TC
  sums = [{'ce': 2.0, 'pixels': 4.0, 'intersection': np.array([1.0, 2.0, 0.0]),
           'denominator': np.array([2.0, 4.0, 1.0])},
          {'ce': 6.0, 'pixels': 2.0, 'intersection': np.array([1.0, 1.0, 0.5]),
           'denominator': np.array([2.0, 4.0, 3.0])}]
  outputs = [{'num_valid': 2, 'loss_sums': sums[0], 'counts': np.stack([found_fc, found_fc])},
             {'num_valid': 1, 'loss_sums': sums[1], 'counts': np.stack([found_fc, np.zeros((2, 3), int)])}]
  monkeypatch.setattr(pipeline, 'eval_batches', lambda *args, **kwargs: iter(outputs))
  monkeypatch.setattr(pipeline, 'put_on_mesh', lambda batch, sharding: batch)
  val = pipeline.Split(None, None, [{'case': 'a'}, {'case': 'a'}, {'case': 'b'}], None, None)
  scores = train.validate(lambda state, out: out, None, val, 2, None, dice_eps=0.0)
  # CE 8 / 6 pixels; Dice FC 2 * 3 / 8, TC 2 * 0.5 / 4.
  assert scores == {'val/loss': pytest.approx(8 / 6 + 1 - (6 / 8 + 1 / 4) / 2), 'val/dice_fc': 1.0,
                    'val/dice_tc': 0.0, 'val/dice_mean': 0.5}


def test_workdir_of_another_model_refuses_to_mix_checkpoints(augmented_tiny):
  config, workdir, _ = augmented_tiny
  other = config.copy_and_resolve_references()
  other.model.features = (8, 16, 32)
  with pytest.raises(CheckpointError, match=r'was trained with model .*features=\(4, 8, 16\).* '
                     r'asks for .*features=\(8, 16, 32\); .*or another workdir$'):
    train.train_and_evaluate(other, workdir)
  starts = [json.loads(line) for line in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert [s['config']['model']['features'] for s in starts] == [[4, 8, 16]]


def test_a_checkpoint_serves_any_dtype_and_depthwise_implementation():
  """The fields that choose only how the network is computed may differ from the checkpoint's; a field of
  the network's own may not."""
  saved = {'model': tiny.get_config().model.to_dict()}
  asked = tiny.get_config().model
  asked.dtype, asked.depthwise_impl = 'bfloat16', 'shift'
  checkpoints.check_same_model(saved, asked, pathlib.Path('ckpt'), instead='another workdir')
  asked.deep_supervision = False
  with pytest.raises(CheckpointError, match=r'ckpt was trained with model name=eas_unet, '
                     r'deep_supervision=True but the config asks for .*deep_supervision=False'):
    checkpoints.check_same_model(saved, asked, pathlib.Path('ckpt'), instead='another workdir')


def test_another_split_of_the_cases_is_refused_on_resume_and_evaluation(augmented_tiny):
  """Another seed (or data.split) would put cases the model trained on into its validation and test sets."""
  config, workdir, _ = augmented_tiny
  before = sorted(p.name for p in workdir.iterdir())
  other = config.copy_and_resolve_references()
  other.seed += 1
  other.train.num_steps += 2
  message = (rf'trained on the cases split by seed={config.seed}, data.split=\(0.7, 0.1, 0.2\) but the '
             rf'config splits them by seed={other.seed}, .* on cases it trained on')
  with pytest.raises(CheckpointError, match=message):
    train.train_and_evaluate(other, workdir)
  with pytest.raises(CheckpointError, match=message):
    evaluate.evaluate(other, workdir)
  assert sorted(p.name for p in workdir.iterdir()) == before


def test_another_label_map_is_refused_on_resume(augmented_tiny):
  """FC and TC swapped (or a plate merged into another) would train the classes on other labels from the
  step the run stopped at; a label map of the same pairs in another order is the same."""
  config, workdir, _ = augmented_tiny
  before = sorted(p.name for p in workdir.iterdir())
  other = config.copy_and_resolve_references()
  other.train.num_steps += 2
  other.data.label_map = ((2, 2), (4, 1))
  with pytest.raises(CheckpointError, match=re.escape(
      'was trained with data.label_map=((2, 1), (4, 2)) but the config gives ((2, 2), (4, 1)), whose classes '
      'are other labels; resume with the label map it was trained with, or start another workdir')):
    train.train_and_evaluate(other, workdir)
  assert sorted(p.name for p in workdir.iterdir()) == before
  saved = {'data': {'label_map': [[4, 2], [2, 1]]}}
  checkpoints.check_same_label_map(saved, config, pathlib.Path('ckpt'))
  checkpoints.check_same_label_map({'data': {}}, config, pathlib.Path('ckpt'))  # a checkpoint predating it


def test_a_store_another_run_renames_in_as_the_training_starts_stops_it(augmented_tiny, tmp_path,
                                                                         monkeypatch):
  """Two runs on one data.cache_dir for other data, started together: a store renamed into place after this
  run's was built would be trained on, under this run's record of its split; it stops instead."""
  config = augmented_tiny[0].copy_and_resolve_references()
  config.data.cache_dir = str(tmp_path / 'cache')
  record = pipeline.record_trained_on

  def and_another_runs_rebuild(workdir, store_dir):
    record(workdir, store_dir)
    shutil.copytree(store_dir, tmp_path / 'other')
    store_dir.rename(tmp_path / 'stale')
    (tmp_path / 'other').rename(store_dir)

  monkeypatch.setattr(pipeline, 'record_trained_on', and_another_runs_rebuild)
  with pytest.raises(DataError, match=r'cache: another run rebuilt this slice store \(data.cache_dir\) for '
                     'other data or another split as this one started; give each run a data.cache_dir of'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not list((tmp_path / 'run').glob('checkpoints/*'))  # before the first step


def test_a_split_file_gives_the_split_whatever_the_seed_and_wherever_it_moved():
  """A sweep's seeds share one split file; a checkpoint trained on a split file is another split than one
  split by seed."""
  config = tiny.get_config()
  config.data.split_file = '/moved/splits.json'
  saved = json.loads(json.dumps(config.to_dict()))
  saved['seed'] += 1
  saved['data']['split_file'] = '/old/splits.json'
  checkpoints.check_same_split(saved, config, pathlib.Path('ckpt'))
  config.data.split_file = ''
  with pytest.raises(CheckpointError, match=r'ckpt was trained on the cases split by data.split_file=given '
                     r'but the config splits them by seed=0, data.split=\(0.7, 0.1, 0.2\)'):
    checkpoints.check_same_split(saved, config, pathlib.Path('ckpt'))
  # A data.root left out of the command, where the checkpoint names one (wherever it moved).
  saved['data']['root'] = '/old/OAI-ZIB'
  config.data.update(root='/moved/OAI-ZIB', split_file='/moved/splits.json')
  checkpoints.check_same_split(saved, config, pathlib.Path('ckpt'))
  config.data.root = ''
  with pytest.raises(CheckpointError, match=re.escape(
      'ckpt was trained on data.root=/old/OAI-ZIB, and data.root is unset (the built-in phantom): give '
      '--config.data.root=/old/OAI-ZIB')):
    checkpoints.check_same_split(saved, config, pathlib.Path('ckpt'))


def test_a_workdir_that_trains_is_not_trained_twice_at_once(augmented_tiny):
  """Refused, and the running training's train.log is left to it."""
  config, workdir, _ = augmented_tiny
  log = (workdir / 'train.log').read_text()
  with open(workdir / '.training.lock', 'a+') as held:  # as another process training it holds the lock
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.truncate(0)
    held.write('process 12345 on node7')
    held.flush()
    with pytest.raises(CheckpointError, match=r'another training of this workdir is running \(process '
                       r'12345 on node7\); stop it first'):
      train.train_and_evaluate(config, workdir)
  assert (workdir / 'train.log').read_text() == log


def test_curves_that_cannot_be_drawn_are_warned_of_not_a_reason_to_stop(tmp_path, monkeypatch, caplog):
  def full_disk(rows, out):
    raise OSError(errno.ENOSPC, 'No space left on device')

  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 1.0}\n')
  monkeypatch.setattr(figures, 'plot_loss_curves', full_disk)
  train._draw_curves(tmp_path)
  assert f"{tmp_path / 'loss_curves.png'} not drawn: No space left on device" in caplog.text


def test_a_training_ended_by_a_bug_logs_its_traceback(tmp_path, monkeypatch):
  def bug(*args):
    raise RuntimeError('a bug')

  monkeypatch.setattr(train, '_train', bug)
  with pytest.raises(RuntimeError):
    train.train_and_evaluate(tiny.get_config(), tmp_path / 'run')
  log = (tmp_path / 'run' / 'train.log').read_text()
  assert re.match(r'E\d{4} [\d:.]+ \d+ test_train\.py:\d+\] ended by an error\nTraceback', log)
  assert log.splitlines()[-1] == 'RuntimeError: a bug'


def test_a_training_removes_what_a_killed_one_left_half_written(augmented_tiny, dead_mark):
  """metrics.jsonl's rewrite on resume, say; the run itself is finished and trains nothing again."""
  config, workdir, _ = augmented_tiny
  left = workdir / (dead_mark('.') + 'metrics.jsonl')
  left.write_text('{"step": 1')
  assert train.train_and_evaluate(config, workdir) is None
  assert not left.exists()


def test_another_set_of_cases_is_refused_on_evaluation_and_the_trained_pixel_kept(augmented_tiny, tmp_path):
  """A case added to the data (the same seed and data.split, which the split check compares) reshuffles the
  seeded split, and would put training cases into the test set: refused against the workdir's record of
  what it trained on, which also keeps the pixel size it trained at."""
  config, workdir, _ = augmented_tiny
  root = tmp_path / 'data'
  for kind in ('images', 'labels'):
    (root / kind).mkdir(parents=True)
    for path in (pathlib.Path(config.data.phantom_dir) / kind).iterdir():
      (root / kind / path.name).symlink_to(path)
    (root / kind / 'phantom_999.nii.gz').symlink_to(root / kind / 'phantom_000.nii.gz')
  other = config.copy_and_resolve_references()
  other.data.update(root=str(root), cache_dir=str(tmp_path / 'store'))
  with pytest.raises(CheckpointError, match=r'its split of the cases is not the one .* trained on '
                     r'\(.* cases; .*use the data it trained on, or another workdir$'):
    evaluate.evaluate(other, workdir)
  trained_on = json.loads((workdir / pipeline.TRAINED_ON).read_text())
  assert pipeline.trained_pixel_mm(other, workdir) == tuple(trained_on['pixel_mm'])
  # In the workdir's own store (a copy of the workdir): refused before the rebuilt store replaces it, on
  # evaluation and on resuming a finished run alike.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  other.data.cache_dir = ''
  splits = (copy / 'slices' / 'splits.json').read_text()
  for run in (evaluate.evaluate, train.train_and_evaluate):
    with pytest.raises(CheckpointError, match=r'its split of the cases is not the one .* trained on'):
      run(other, copy)
    assert (copy / 'slices' / 'splits.json').read_text() == splits


def test_the_latest_keep_steps_and_the_best_by_validation_dice_are_kept(tmp_path):
  mngr = checkpoints.manager(tmp_path, keep=2, for_training=True)
  for step, dice in enumerate([0.1, 0.9, 0.3, 0.2, 0.4], start=1):
    checkpoints.save(mngr, step, {'w': jax.numpy.full(2, step, np.float32)}, tiny.get_config(),
                     {checkpoints.BEST_METRIC: dice})
  assert sorted(mngr.all_steps()) == [2, 4, 5] and mngr.best_step() == 2


def test_finished_run_is_not_trained_again(augmented_tiny):
  config, workdir, _ = augmented_tiny
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert train.train_and_evaluate(config, workdir) is None
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before


@pytest.mark.parametrize('part', ['state', 'config'])
def test_a_corrupt_checkpoint_to_resume_is_one_line_naming_the_one_before(augmented_tiny, tmp_path, part):
  # Its files cut short, as a full disk or a broken copy leaves them.
  config, workdir, _ = augmented_tiny
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  for chunk in (copy / 'checkpoints' / '6' / part).rglob('*'):
    if chunk.is_file():
      chunk.write_bytes(chunk.read_bytes()[:10])
  earlier = max(s for s in checkpoints.manager(copy, config.checkpoint.keep).all_steps() if s < 6)
  longer = config.copy_and_resolve_references()
  longer.train.num_steps = 8
  with pytest.raises(CheckpointError, match=r'checkpoints/6: unreadable or corrupt checkpoint \(.*\); '
                     rf'remove it to resume from step {earlier}$') as error:
    train.train_and_evaluate(longer, copy)
  assert '\n' not in str(error.value)


def test_a_checkpoint_of_another_state_layout_is_not_called_corrupt(tmp_path):
  """Whole files of a state another version laid out otherwise: removing the checkpoint would not help."""
  mngr = checkpoints.manager(tmp_path, 2)
  for step in (1, 2):
    checkpoints.save(mngr, step, {'params': {'w': jax.numpy.zeros(3)}}, default.get_config())
  mngr.wait_until_finished()
  # As training restores: each leaf with its sharding (orbax words a structure mismatch otherwise then).
  replicated = parallel.shardings(parallel.make_mesh())[1]
  for abstract in ({'params': {'w': jax.ShapeDtypeStruct((4,), np.float32, sharding=replicated)}},
                   {'params': {'w': jax.ShapeDtypeStruct((3,), np.float32, sharding=replicated)},
                    'opt_state': {'mu': jax.ShapeDtypeStruct((3,), np.float32, sharding=replicated)}},
                   {'params': {'v': jax.ShapeDtypeStruct((3,), np.float32, sharding=replicated)}}):
    with (pytest.raises(CheckpointError, match=r'checkpoints/2: a training state laid out otherwise '
                        r'than this version of easunet_jax lays it out \(.*\); read it with the version that '
                        r'wrote it, or start another workdir$'), checkpoints.unreadable_to_resume(mngr, 2)):
      checkpoints.restore(mngr, 2, abstract)


def test_the_reads_a_failed_restore_leaves_in_flight_are_silent(tmp_path, capsys, caplog):
  """Each read still running as orbax gives up ends in 'Event loop is closed' (as an unraisable error, or
  through sys.excepthook from tensorstore's threads) or in an error asyncio logs as nobody awaits it:
  hundreds of tracebacks around the one-line error, from the first read on."""
  with checkpoints._unreadable_as_one_line(tmp_path):
    pass
  closed = RuntimeError('Event loop is closed')
  sys.excepthook(RuntimeError, closed, None)
  sys.unraisablehook(type('Unraisable', (), {'exc_value': closed})())
  with caplog.at_level(logging.ERROR):
    logging.getLogger('asyncio').error('Future exception was never retrieved\nfuture: <Future finished>')
    logging.getLogger('asyncio').error('another asyncio error')
  assert capsys.readouterr().err == ''
  assert [r.getMessage() for r in caplog.records] == ['another asyncio error']


def test_checkpoint_errors_name_the_cause_and_a_full_disk_while_saving(tmp_path):
  # What orbax raises: tensorstore's error (the cause) wrapped in a bare Exception.
  step = tmp_path / 'ckpt' / '6'
  step.mkdir(parents=True)  # there: a file of it cut short
  with (pytest.raises(CheckpointError, match=f'^{step}: unreadable or corrupt checkpoint \\(OUT_OF_RANGE: '
                      r'Requested byte range\)$'),
        checkpoints._unreadable_as_one_line(step)):
    raise Exception('Encountered error while reading array index') from ValueError(
        'OUT_OF_RANGE: Requested byte range')
  # Out of memory while restoring says nothing of the files: no advice to remove them.
  with (pytest.raises(ValueError, match='RESOURCE_EXHAUSTED: Out of memory'),
        checkpoints._unreadable_as_one_line(pathlib.Path('/ckpt/6'), '; remove it')):
    raise ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB')

  # A full disk as tensorstore reports it (writing arrays) and as orbax does (writing metadata).
  for error in (ValueError('RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database: Failed to write '
                           "16255 bytes to file 24: No space left on device [os_error_code='28']"),
                OSError(errno.ENOSPC, 'No space left on device')):
    class FullDisk:
      directory = tmp_path / 'checkpoints'

      def save(self, *args, error=error, **kwargs):
        raise error
    with pytest.raises(CheckpointError, match=r'checkpoints/4: No space left on device while saving; free '
                       'space and run the same command to resume from the last checkpoint$'):
      checkpoints.save(FullDisk(), 4, {}, tiny.get_config())


@pytest.mark.parametrize('split, which', [((0.75, 0.0, 0.25), 'validation'), ((0.0, 0.5, 0.5), 'training')])
def test_a_split_without_cases_is_refused_before_any_step(augmented_tiny, tmp_path, split, which):
  """Validation picks the best checkpoint: without a validation case a run would fail at its first round,
  losing the steps before it."""
  config = augmented_tiny[0].copy_and_resolve_references()
  config.data.split = split
  with pytest.raises(DataError, match=f'no {which} slices'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not checkpoints.manager(tmp_path / 'run', 2).all_steps()


def test_a_batch_larger_than_the_training_slices_is_refused_before_any_step(augmented_tiny, tmp_path):
  config = augmented_tiny[0].copy_and_resolve_references()
  config.train.batch_size = 64
  with pytest.raises(DataError, match=r'^\d+ training slices give no full batch of train.batch_size 64$'):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_a_signal_asks_once_to_stop_a_second_ctrl_c_acts_as_usual_and_a_second_sigterm_waits():
  """The first signal is the loop's to act on. After a Ctrl-C the handler before it is back at once (a
  second Ctrl-C kills); SIGTERMs that follow the first (a sweep's death by SIGKILL sends several) leave the
  save under way to finish. Both handlers are back when training ends."""
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with train._stop_requests() as stop:
    assert stop() is None
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)
    assert stop() == 'SIGTERM' and signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
  assert {s: signal.getsignal(s) for s in before} == before
  with train._stop_requests() as stop:
    signal.raise_signal(signal.SIGINT)
    assert stop() == 'SIGINT' and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
  assert {s: signal.getsignal(s) for s in before} == before


def _poison_a_training_slice(config, workdir, step: int) -> list[int]:
  """Builds the run's slice store and writes NaN into one slice that the training order first reaches at
  `step` (1-based); returns the steps (of the first six) whose batch holds it."""
  store = preprocess.prepare_data(config, workdir)
  images = np.load(store / 'train' / 'images.npy', mmap_mode='r+')
  batches = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), config.train.batch_size,
                                    config.seed, workers=0)
  order = [next(batches)['image'][..., 0] for _ in range(6)]
  row = next(r for r in range(len(images))
             if np.array_equal(images[r].astype(np.float32), order[step - 1][0]))
  hit = [s for s, batch in enumerate(order, 1) if any(np.array_equal(images[row], x) for x in batch)]
  assert hit[0] == step
  images[row] = np.nan
  images.flush()
  return hit


def _nan_config(phantom_dir):
  config = tiny.get_config()
  config.data.phantom_dir = str(phantom_dir)
  config.checkpoint.every_steps = 2
  return config


def _saved_state_is_finite(workdir, step: int) -> bool:
  state = ocp.StandardCheckpointer().restore(workdir.absolute() / 'checkpoints' / str(step) / 'state')
  return all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_nan_in_the_data_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path):
  config = _nan_config(tmp_path / 'phantom')
  _poison_a_training_slice(config, tmp_path / 'run', step=3)
  # Checked (a host sync) only at the checkpoints, steps 2, 4 and 6: the step named is the one recorded on
  # the device.
  config.log.every_steps = config.train.eval_every_steps = 6
  with pytest.raises(UserError, match=re.escape(
      'non-finite loss or gradients at step 3 (found at step 4); stopped without saving')):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert checkpoints.manager(tmp_path / 'run', 2).latest_step() == 2
  assert _saved_state_is_finite(tmp_path / 'run', 2)


def test_nan_policy_skip_trains_through_a_nan_slice_and_counts_the_skips(tmp_path):
  config = _nan_config(tmp_path / 'phantom')
  config.train.nan_policy = 'skip'
  hit = _poison_a_training_slice(config, tmp_path / 'run', step=2)
  train.train_and_evaluate(config, tmp_path / 'run')
  rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r.get('train/skipped_steps')] == hit
  # A logging period whose steps were all skipped has no loss to average; the others have a finite one.
  assert [r['step'] for r in rows if 'train/loss' in r] == [s for s in range(1, 7) if s not in hit]
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)
  assert _saved_state_is_finite(tmp_path / 'run', 6)


def test_nan_policy_skip_stops_when_every_step_is_skipped(tmp_path, monkeypatch):
  config = _nan_config(tmp_path / 'phantom')
  config.train.nan_policy = 'skip'
  store = preprocess.prepare_data(config, tmp_path / 'run')
  images = np.load(store / 'train' / 'images.npy', mmap_mode='r+')
  images[:] = np.nan  # every batch: no step can be taken
  images.flush()
  monkeypatch.setattr(train, 'MAX_SKIPPED_IN_A_ROW', 4)
  with pytest.raises(UserError, match=re.escape(
      'the last 4 steps (to step 4) were all skipped for a non-finite loss or gradients '
      '(train.nan_policy=skip): the model no longer trains; the last checkpoint is '
      f"{(tmp_path / 'run' / 'checkpoints' / '3').absolute()}. Train again in a new --workdir with a lower "
      'optim.lr (a run resumed here starts from that checkpoint) or check the data')):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_a_class_no_validation_case_holds_is_warned_of_and_the_run_ends_saying_where_it_is(tmp_path, caplog):
  """Validation labels without femoral cartilage (a wrong data.label_map) give FC Dice 1 wherever the model
  marks none: warned of once, as training starts. The run's last line names its checkpoints."""
  config = _nan_config(tmp_path / 'phantom')
  config.train.num_steps = 4
  store = preprocess.prepare_data(config, tmp_path / 'run')
  labels = np.load(store / 'val' / 'labels.npy', mmap_mode='r+')
  labels[labels == 1] = 0
  labels.flush()
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(config, tmp_path / 'run')
  # The run ends on a line that says where its checkpoints are and what to run next.
  folder = (tmp_path / 'run' / 'checkpoints').absolute()
  [done] = [r.getMessage() for r in caplog.records if r.getMessage().startswith('training finished')]
  assert re.fullmatch(
      re.escape(f'training finished at step 4: checkpoints in {folder}, the best by validation Dice at step ')
      + '[34]' + re.escape('; score it on the test split with the same command and --mode=evaluate'), done)
  warning = ("no validation case's labels hold FC: its Dice is 1 (100 %) wherever the model marks none of "
             'it, and tells nothing; check data.label_map')
  assert caplog.text.count(warning) == 1 and 'hold TC' not in caplog.text


@pytest.mark.parametrize('nan_policy', ['stop', 'skip'])
def test_a_validation_loss_not_finite_stops_the_run_without_its_checkpoint(tmp_path, nan_policy):
  """Outputs on the validation slices that are NaN (here of NaN slices; in use, of diverged weights) stop
  the run before the checkpoint of that step is saved or ranked, whatever train.nan_policy."""
  config = _nan_config(tmp_path / 'phantom')
  config.train.nan_policy = nan_policy
  config.train.eval_every_steps = 4
  store = preprocess.prepare_data(config, tmp_path / 'run')
  images = np.load(store / 'val' / 'images.npy', mmap_mode='r+')
  images[:] = np.nan
  images.flush()
  with pytest.raises(UserError, match=re.escape(
      "the validation loss at step 4 is not finite: the network's outputs on the validation slices are NaN "
      'or infinite; stopped without saving, the last checkpoint is '
      f"{(tmp_path / 'run' / 'checkpoints' / '2').absolute()}. Train again in a new --workdir")):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert checkpoints.manager(tmp_path / 'run', 2).all_steps() == [2]


def test_init_weights_start_a_new_run_from_a_model_file(augmented_tiny, tmp_path, monkeypatch):
  config, workdir, _ = augmented_tiny
  model_file = tmp_path / 'model.npz'
  pretrained.export(config, workdir, model_file)
  _, _, exported = pretrained.load(config, model_file, parallel.make_mesh())
  tuned = config.copy_and_resolve_references()
  tuned.train.init_weights = str(model_file)
  first = {}
  jit_steps = steps.jit_steps

  def first_step_only(*args, **kwargs):
    def record_and_stop(state, batch):
      first['state'] = state
      raise Killed
    return record_and_stop, jit_steps(*args, **kwargs)[1]

  monkeypatch.setattr(steps, 'jit_steps', first_step_only)
  monkeypatch.setattr(train, '_compile_and_size', lambda *args: None)
  with pytest.raises(Killed):
    train.train_and_evaluate(tuned, tmp_path / 'run')
  state = first['state']
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((exported.params, exported.batch_stats)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not np.asarray(m).any() for m in jax.tree.leaves(state.opt_state))  # momentum starts at zero

  other = tuned.copy_and_resolve_references()
  other.model.features = (8, 16, 32)
  with pytest.raises(CheckpointError, match=r'model\.npz.*features=\(4, 8, 16\).*features=\(8, 16, 32\); '
                     r'.*or a model file of this network$'):
    train.train_and_evaluate(other, tmp_path / 'other')
  assert not (tmp_path / 'other' / 'slices').exists()  # refused before the slice store is built
  # A model file moved away: a new run is refused before its store is built; a resumed (here a finished) run
  # ignores it, and the start-up checks leave it to the run.
  tuned.train.init_weights = str(tmp_path / 'absent.npz')
  config_check.check_config(tuned, default.get_config(), 'train')
  with pytest.raises(ConfigError, match=r'^train\.init_weights: expected a model file \(--mode=export\), got '
                     r'.*absent\.npz\', which is not a file$'):
    train.train_and_evaluate(tuned, tmp_path / 'fresh')
  assert not (tmp_path / 'fresh' / 'slices').exists()
  shutil.copytree(workdir, tmp_path / 'resumed')
  assert train.train_and_evaluate(tuned, tmp_path / 'resumed') is None  # finished: nothing to do
