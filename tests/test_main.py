"""`python main.py` as a user runs it: kill -9 and SIGTERM, each followed by a resume (in this process, which
runs main.py's program), bad configs, prediction with the shipped model, and Ctrl-C in a batch of it."""

import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import ml_collections
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default, tiny
from easunet_jax import checkpoints, config_check, pretrained, train
from easunet_jax.data import phantom, volumes
from easunet_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Each run of a `--hook` kills itself with SIGKILL at one exact moment: a real kill -9, placed where a test
# needs it. `main.py` then runs as it would from the command line.
_RUN_MAIN = """
import os, runpy, signal, sys
# Ctrl-C as Python in a terminal has it: a non-interactive shell starts a command put in the background
# (`bash .ci/run &`) with SIGINT ignored, every process under it inherits that, and Python then installs no
# KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
{hook}
sys.argv[0] = 'main.py'
runpy.run_path('main.py', run_name='__main__')
"""
KILL_AT_FINALIZE = """
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def dying_finalize(self):
  if self.get_final().name == '{step}':  # all written, not yet renamed into place
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = dying_finalize
"""
SIGNAL_AT_BATCH = """
from easunet_jax.data import pipeline
put_on_mesh, fetched = pipeline.put_on_mesh, []
def signalling_put_on_mesh(batch, *args, **kwargs):
  fetched.extend([0] * ('mask' not in batch))  # validation batches carry a mask
  if len(fetched) == {n}:
    signal.raise_signal(signal.{signal})  # to this (the main) thread: handled before the call returns
  return put_on_mesh(batch, *args, **kwargs)
pipeline.put_on_mesh = signalling_put_on_mesh
"""

SIGNAL_AT_SECOND_SCAN = """
from easunet_jax import predict
segment_scan, calls = predict._segment_scan, []
def interrupted_segment_scan(*args, **kwargs):
  calls.append(0)
  if len(calls) == 2:
    signal.raise_signal(signal.{signal})  # as the second scan begins, raised in this thread at once
  return segment_scan(*args, **kwargs)
predict._segment_scan = interrupted_segment_scan
"""

SWALLOWED_STOP = """
import time
from easunet_jax import predict
def swallowing_predict(*args, **kwargs):
  sys.modules['__main__']._STOP_GRACE_S = 2  # easunet_jax/__main__.py's, as it runs
  try:
    signal.raise_signal(signal.{signal})
  except BaseException:  # as a callback of asyncio (orbax reading a checkpoint) or of the garbage collector
    pass
  time.sleep(600)  # and the work hangs
predict.predict = swallowing_predict
"""

REPORT_PREDICT = """
from easunet_jax import predict
def report(config, workdir, input_path, output_path, model_file=None, **kwargs):
  print('predict', workdir, model_file, kwargs['laterality'])
predict.predict = report
"""

COMPILE_IN_PREDICT = """
from easunet_jax import environment
environment.configure()  # as main.py does first: before predict imports matplotlib
import jax
from easunet_jax import predict
predict.predict = lambda *args, **kwargs: print(jax.jit(lambda x: x + 1)(1))
"""

DISK_FULL = """
import errno
from easunet_jax import pretrained, train
def disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device', *{filename})
train.train_and_evaluate = pretrained.export = disk_full
"""


@pytest.fixture(scope='module')
def phantom_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('phantom')


def _command(workdir, phantom_dir, *overrides, hook=''):
  """main.py on configs/tiny.py with conftest's `augmented_tiny` settings bar its learning rate and schedule
  (overrides), which the checks of bad flags need not compile for."""
  args = ['--config=configs/tiny.py', f'--workdir={workdir}', f'--config.data.phantom_dir={phantom_dir}',
          '--config.data.augment=true', '--config.checkpoint.every_steps=2', *overrides]
  if hook:
    return [sys.executable, '-c', _RUN_MAIN.format(hook=hook), *args]
  return [sys.executable, 'main.py', *args]


def _run(*args, **kwargs):
  return subprocess.run(_command(*args, **kwargs), check=False, cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _state(workdir, step):
  path = pathlib.Path(workdir).absolute() / 'checkpoints' / str(step) / 'state'
  return ocp.StandardCheckpointer().restore(path)


def _assert_bitwise_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _logged(workdir) -> list[dict]:
  """The rows of the run's metrics.jsonl, bar the speed."""
  return [{k: v for k, v in json.loads(line).items() if k != 'train/steps_per_s'}
          for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def test_kill_9_during_a_save_and_during_a_step_then_resume_ends_bitwise_like_no_kill(
    augmented_tiny, tmp_path, caplog):
  config, uninterrupted, _ = augmented_tiny  # trained in this process
  phantom_dir, workdir = config.data.phantom_dir, tmp_path / 'run'
  lr = (f'--config.optim.lr={config.optim.lr}', f'--config.optim.schedule={config.optim.schedule}')
  killed = _run(workdir, phantom_dir, *lr, hook=KILL_AT_FINALIZE.format(step=4))
  assert killed.returncode == -signal.SIGKILL
  half_written = list((workdir / 'checkpoints').glob('4.orbax-checkpoint-tmp*'))
  assert half_written and not (workdir / 'checkpoints' / '4').exists()
  # Checkpoints come at steps 2, 3 (validation), 4 and 6. Resumed from step 3, the run is killed again
  # in step 5, while the third batch it fetched (step 6's) was loading.
  killed = _run(workdir, phantom_dir, *lr, hook=SIGNAL_AT_BATCH.format(n=3, signal='SIGKILL'))
  assert killed.returncode == -signal.SIGKILL
  assert f'Resumed from {workdir / "checkpoints" / "3"} at step 3' in killed.stderr
  assert not list((workdir / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
  assert checkpoints.manager(workdir, 2).latest_step() == 4
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)  # main.py's program: conftest gives this process its settings
  assert f'Resumed from {workdir / "checkpoints" / "4"} at step 4' in caplog.text
  _assert_bitwise_equal(_state(workdir, 6), _state(uninterrupted, 6))
  # Each resume dropped the rows the killed run logged past its checkpoint: the log is the uninterrupted
  # run's, row for row (bar the speed).
  assert _logged(workdir) == _logged(uninterrupted)
  starts = [json.loads(line) for line in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert [s['start_step'] for s in starts] == [0, 3, 4]
  assert starts[0]['config']['model']['features'] == list(tiny.get_config().model.features)
  assert starts[0]['code_version']


def test_sigterm_saves_the_current_step_exits_143_and_the_run_resumes(augmented_tiny, tmp_path, caplog):
  workdir = tmp_path / 'run'
  # Checkpoints and log rows only at the end: the ones written before it are the signal's. The signal
  # comes as the third training batch is fetched, while an earlier step runs.
  config = augmented_tiny[0].copy_and_resolve_references()
  config.checkpoint.every_steps = config.train.eval_every_steps = config.log.every_steps = 1000
  apart = ['--config.checkpoint.every_steps=1000', '--config.train.eval_every_steps=1000',
           '--config.log.every_steps=1000', f'--config.optim.lr={config.optim.lr}',
           f'--config.optim.schedule={config.optim.schedule}']
  stopped = _run(workdir, config.data.phantom_dir, *apart, hook=SIGNAL_AT_BATCH.format(n=3, signal='SIGTERM'))
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr  # unfinished: `&& evaluate` stops here
  step = checkpoints.manager(workdir, 2).latest_step()
  assert 1 <= step < 6
  saved = workdir / 'checkpoints' / str(step)
  assert f'Stopped by SIGTERM at step {step} of 6; checkpoint saved in {saved}' in stopped.stderr
  # The workdir's train.log holds the training's lines as printed, up to the stop.
  log = (workdir / 'train.log').read_text().splitlines()
  assert set(log) <= set(stopped.stderr.splitlines()) and 'Stopped by SIGTERM' in log[-1]
  assert any('Training ' in line and ' for 6 steps' in line for line in log)
  # The steps trained before the stop are logged (the loss of steps 1..step), not lost with the run.
  assert [row['step'] for row in _logged(workdir)] == [step] and 'train/loss' in _logged(workdir)[0]
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert f'Resumed from {saved} at step {step}' in caplog.text
  assert checkpoints.manager(workdir, 2).latest_step() == 6
  assert [row['step'] for row in _logged(workdir) if 'train/loss' in row] == [step, 6]
  assert 'the schedule jumps' not in caplog.text  # resumed with the config it was saved with
  # The finished run given more steps: its poly decay, at 0 by step 6, would start again near half the rate.
  caplog.clear()
  config.train.num_steps = 8
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert (f'resuming at step 6 with a learning rate of {1e-4 * (2 / 8) ** 0.9:.3g}, where the config it was '
          "saved with gives 0 (6 steps, optim.lr 0.0001, optim.schedule 'poly'; now 8, 0.0001, 'poly'): the "
          'schedule jumps; to train a finished run further, export it (--mode=export) and start another '
          'workdir from it (--config.train.init_weights) with the learning rate to go on at '
          '(--config.optim.lr)') in caplog.text


# Through main.py: absl's flag parsing, and one check of config_check, each with exit code 2 and one line.
BAD_FLAGS = {
    'unknown field': ('--config.train.learning_rate=0.1',
                      '--config.train.learning_rate: no such config field'),
    'wrong type': ('--config.train.batch_size=four', 'flag --config.train.batch_size=four: invalid literal'),
    'batch vs devices': ('--config.train.batch_size=6',
                         'train.batch_size: expected a multiple of the device count 4, got 6'),
    'labels to train': ('--labels=labels/', '--labels scores the masks of --mode=predict'),
    'predict flag to train': ('--series=1.2.3', '--series is for --mode=predict, not --mode=train'),
    'stray argument': ('labels/', "unexpected arguments ['labels/']: every argument is a flag"),
    'mistyped flag': ('--save_probability', "Unknown command line flag 'save_probability'. Did you mean: "
                                            'save_probabilities ?'),
    'element of a sequence': ('--config.model.features.0=3',
                              '--config.model.features.0: model.features is set whole, e.g. '
                              '--config.model.features="(32, 64, 128, 256, 512)"'),
    'a tuple field twice': (('--config.model.features=(8, 16, 32)', '--config.model.features=(8, 16)'),
                            '--config.model.features is given 2 times ((8, 16, 32), then (8, 16)), and absl '
                            'would join them into one tuple; give it once'),
}
# config_check's other start-up checks, called as main.py calls it (a process each would add ~6 s).
BAD_VALUES = {
    'widths': ({'model.features': (4, 8, 16, 32)}, '3 side outputs but 2 loss.side_weights'),
    'image size': ({'data.phantom_shape': (8, 42, 42)}, 'data.phantom_shape: expected 3 positive'),
    'image width': ({'data.phantom_shape': (8, 64, 42)}, 'data.phantom_shape: expected 3 positive'),
    'flat phantom voxel': ({'data.phantom_spacing': (0.0, 2.0, 2.0)},
                           'data.phantom_spacing: expected 3 positive'),
    'missing split file': ({'data.split_file': '/no/such/split.json'},
                           "data.split_file: expected a JSON file or ''"),
    'no validation cadence': ({'train.eval_every_steps': 0},
                              'train.eval_every_steps: expected a positive integer, got 0'),
    'no log cadence': ({'log.every_steps': 0}, 'log.every_steps: expected a positive integer, got 0'),
    'missing data.root': ({'data.root': '/no/such/dir'}, 'data.root: expected a dataset directory'),
    'negative smoothing': ({'predict.slice_sigma_mm': -1.0},
                           'predict.slice_sigma_mm: expected a non-negative number'),
    'zero zoom': ({'predict.zoom': 0.0}, 'predict.zoom: expected a positive number'),
    'negative background weight': ({'predict.background_weight': -1.0},
                                   'predict.background_weight: expected a positive number'),
    'batch of one': ({'train.batch_size': 1}, 'train.batch_size: expected at least 2 for the EAS module'),
    'negative learning rate': ({'optim.lr': -0.01}, 'optim.lr: expected a positive number'),
    'momentum of 1': ({'optim.momentum': 1.0}, 'optim.momentum: expected a number from 0 to below 1'),
    'negative weight decay': ({'optim.weight_decay': -1e-4}, 'optim.weight_decay: expected a non-negative'),
    'component fraction': ({'predict.min_component_fraction': 1.0},
                           'predict.min_component_fraction: expected a fraction from 0 to below 1'),
    'osteoarthritic fraction': ({'data.phantom_oa_fraction': 1.5},
                                'data.phantom_oa_fraction: expected a fraction from 0 to 1'),
    'negative elastic field': ({'data.phantom_elastic_mm': -1.0},
                               'data.phantom_elastic_mm: expected a non-negative number'),
    'negative effusion': ({'data.phantom_effusion_mm': -1.0},
                          'data.phantom_effusion_mm: expected a non-negative number'),
    'label map class beyond the classes': ({'data.label_map': ((2, 1), (4, 2), (5, 3))},
                                           'data.label_map: expected (source label, training class) pairs'),
    'label map source beyond uint8': ({'data.label_map': ((2, 1), (300, 2))},
                                      'data.label_map: expected (source label, training class) pairs, labels '
                                      '0-255 and classes 0-2 (model.num_classes 3), one class at least not '
                                      '0, got ((2, 1), (300, 2))'),
    'label map triple': ({'data.label_map': ((2, 1, 0),)}, 'data.label_map: expected (source label'),
    'label map without cartilage': ({'data.label_map': ((2, 0),)}, 'data.label_map: expected (source label'),
    'label of two classes': ({'data.label_map': ((2, 1), (2, 2), (4, 2))},
                             'data.label_map: source label 2 given 2 pairs, expected one (each label maps to '
                             'one class), got ((2, 1), (2, 2), (4, 2))'),
    'not-a-number zoom': ({'predict.zoom': float('nan')}, 'predict.zoom: expected finite numbers, got nan'),
    'infinite learning rate': ({'optim.lr': float('inf')}, 'optim.lr: expected finite numbers, got inf'),
    'negative seed': ({'seed': -1}, 'seed: expected an integer from 0 to 2**32 - 1, got -1'),
    'one width': ({'model.features': (4,)}, 'model.features: expected positive integers, one width per'),
    'a width of 0': ({'model.features': (4, 0, 16)}, 'model.features: expected positive integers'),
    'dilation 0': ({'model.aspp_rates': (0, 6, 12)}, 'model.aspp_rates: expected positive integers'),
    'negative side weight': ({'loss.side_weights': (0.5, -1.0, 0.1)},
                             'loss.side_weights: expected non-negative numbers'),
    'zero Dice smoothing': ({'loss.dice_eps': 0.0}, 'loss.dice_eps: expected a positive number'),
    'a fourth class': ({'model.num_classes': 4}, 'model.num_classes: expected 3 (background, femoral and'),
    'one-number pixel': ({'predict.spacing': (0.5,)}, 'predict.spacing: expected the in-plane pixel in mm'),
    'negative pixel': ({'predict.spacing': (-1.0, -1.0)}, 'predict.spacing: expected the in-plane pixel'),
    'half a pixel': ({'predict.spacing': (0.5, 0.0)}, 'predict.spacing: expected the in-plane pixel'),
    'phantom voxel of two sizes': ({'data.phantom_spacing': (2.0, 2.0)},
                                   'data.phantom_spacing: expected 3 positive voxel sizes in mm'),
    'negative figure slices': ({'eval.num_figure_slices': -1},
                               'eval.num_figure_slices: expected a non-negative number'),
    'checkpoint name': ({'eval.checkpoint': 'last'}, "eval.checkpoint: expected 'best', 'latest' or a step"),
    'empty run name': ({'name': ''},
                       "name: expected a folder name under runs/ (the default --workdir), got ''"),
    'run name above runs/': ({'name': '../x'}, 'name: expected a folder name under runs/'),
    'osteoarthritic schematic knees': ({'data.phantom_oa_fraction': 0.5},
                                       "data.phantom_oa_fraction: osteoarthritic knees are drawn with "
                                       "data.phantom_anatomy='reference', got 'schematic'"),
    'warped schematic knees': ({'data.phantom_elastic_mm': 3.0},
                               "data.phantom_elastic_mm: knees are warped from the real one with "
                               "data.phantom_anatomy='reference', got 'schematic'"),
    'schematic knees with effusions': ({'data.phantom_effusion_mm': 10.0},
                                       "data.phantom_effusion_mm: large effusions are drawn with "
                                       "data.phantom_anatomy='reference', got 'schematic'"),
    'negative rotation': ({'data.augment_rotate_deg': -10.0},
                          'data.augment_rotate_deg: expected degrees from 0 to 180'),
    'rotation past a half turn': ({'data.augment_rotate_deg': 400.0},
                                  'data.augment_rotate_deg: expected degrees from 0 to 180'),
    'slice store a file': ({'data.cache_dir': __file__},
                           'data.cache_dir: expected a folder (made if missing)'),
}


# The edges of the ranges BAD_VALUES refuses beyond: allowed (plain SGD has momentum 0).
EDGE_VALUES = {'optim.momentum': 0.0, 'optim.weight_decay': 0.0, 'predict.min_component_fraction': 0.0,
               'data.phantom_oa_fraction': 1.0, 'predict.slice_sigma_mm': 0.0, 'data.phantom_elastic_mm': 0.0,
               'data.phantom_effusion_mm': 0.0, 'eval.num_figure_slices': 0, 'seed': 2 ** 32 - 1,
               'predict.spacing': (0.0, 0.0),
               'eval.checkpoint': '100', 'data.augment_rotate_deg': 180.0,
               'data.label_map': ((1, 1), (255, 2)),
               'loss.side_weights': (0.0,) * len(tiny.get_config().loss.side_weights)}


@pytest.mark.parametrize('field', EDGE_VALUES)
def test_the_edge_of_each_allowed_range_passes(field):
  config = tiny.get_config()
  config.data.phantom_anatomy = 'reference'  # whose knees may be osteoarthritic
  config.update_from_flattened_dict({field: EDGE_VALUES[field]})
  config_check.check_config(config, default.get_config(), 'train')


def test_an_unknown_field_is_told_with_the_fields_of_its_group_or_the_top():
  reference = default.get_config()
  for override, expected in (('--config.optim.l=1', 'optim.lr, optim.momentum'),
                             ('--config.optm.lr=1', 'loss, model, name, optim'),
                             ('--config.lr=1', 'loss, model, name, optim')):
    message = config_check.override_error(KeyError('unknown'), [override], reference)
    assert message.startswith(f'{override.partition("=")[0]}: no such config field (expected one of ')
    assert expected in message
  message = config_check.override_error(KeyError('unknown'), ['--config.optim=1'], reference)
  assert message == ('--config.optim: a group of fields, set one of them '
                     '(optim.lr, optim.momentum, optim.schedule, optim.weight_decay)')
  # A config file's misspelt group: the groups there are.
  config = tiny.get_config()
  config.trian = ml_collections.ConfigDict({'num_steps': 1})
  with pytest.raises(ConfigError, match=r'^trian.num_steps: no such config field \(expected one of check'):
    config_check.check_config(config, reference, 'train')


def test_a_config_files_field_of_another_type_is_named():
  """A config file may build its own ConfigDict, whose fields then hold any type."""
  fields = tiny.get_config().to_dict()
  fields['train']['batch_size'] = '8'
  with pytest.raises(ConfigError, match=r"^train\.batch_size: expected an integer, got '8'$"):
    config_check.check_config(ml_collections.ConfigDict(fields), default.get_config(), 'train')
  fields['train']['batch_size'] = 8
  fields['model']['features'] = (4, 8.5, 16)
  with pytest.raises(ConfigError, match=r'^model\.features: expected a sequence like'):
    config_check.check_config(ml_collections.ConfigDict(fields), default.get_config(), 'train')


def test_predict_and_export_read_no_data_set():
  """A workdir copied from another machine names a data.root that is not here."""
  config = tiny.get_config()
  config.data.root = '/no/such/dir'
  for mode in ('predict', 'export'):
    config_check.check_config(config, default.get_config(), mode)


def test_a_config_files_own_error_shows_its_traceback(tmp_path):
  config = tmp_path / 'sizes.py'
  config.write_text("SIZES = {'small': 4}\n\ndef get_config():\n  return SIZES['large']\n")
  result = subprocess.run([sys.executable, 'main.py', f'--config={config}', f'--workdir={tmp_path / "run"}'],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1 and "return SIZES['large']" in result.stderr and 'KeyError' in result.stderr


@pytest.mark.parametrize('body, message', [
    ("c = tiny.get_config()\n  del c.train['nan_policy']\n  c.optim = {'lr': 0.1}\n  return c",
     r'--config: its config lacks 4 field\(s\) \(optim\.momentum, optim\.schedule, optim\.weight_decay, '
     r"train\.nan_policy\): a file of an older version, or a group assigned whole\? Start from "
     r"configs/default\.py's get_config\(\)"),
    ('return dict(tiny.get_config())', r'--config: its get_config\(\) returned dict, expected an '),
    ('tiny.get_config()', r'--config: its get_config\(\) returned NoneType, expected an '),
    ('return 5', r'--config: its get_config\(\) returned int, expected an ')])
def test_a_config_file_without_every_field_is_one_line(body, message, tmp_path):
  """A researcher's own config file that lacks fields (copied from an older version), or returns another
  type (a dict, or nothing: after absl's own warning of it): one line, not a traceback where the field is
  first read."""
  config = tmp_path / 'mine.py'
  config.write_text(f'from configs import tiny\n\ndef get_config():\n  {body}\n')
  result = subprocess.run([sys.executable, 'main.py', f'--config={config}', f'--workdir={tmp_path / "run"}'],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
  assert re.match(f'error: {message}', result.stderr.splitlines()[-1]), result.stderr


def test_a_config_file_without_get_config_is_one_line(tmp_path):
  """A file that defines no get_config: one line; an AttributeError of the file's own code (another
  module's get_config) keeps its traceback."""
  config = tmp_path / 'mine.py'
  for text, code, last in (
      ('SIZE = 4\n', 2, "error: --config: the file has no get_config(): start from configs/default.py's "
       'get_config() and set fields on it'),
      ('import os\n\ndef get_config():\n  return os.get_config()\n', 1,
       "AttributeError: module 'os' has no attribute 'get_config'")):
    config.write_text(text)
    result = subprocess.run([sys.executable, 'main.py', f'--config={config}', f'--workdir={tmp_path}/run'],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (code, last), result.stderr


def test_an_override_of_a_field_the_config_file_lacks_is_one_line(tmp_path):
  """absl sets the override before the file's fields are checked, and ml_collections' bare KeyError read as
  an error of the file's own code (a traceback of "'nan_policy'"; in a sweep, that word alone)."""
  config = tmp_path / 'mine.py'
  config.write_text("from configs import tiny\n\ndef get_config():\n  c = tiny.get_config()\n"
                    "  del c.train['nan_policy']\n  return c\n")
  result = subprocess.run([sys.executable, 'main.py', f'--config={config}', '--config.train.nan_policy=skip',
                           f'--workdir={tmp_path / "run"}'],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert (result.returncode, result.stderr) == (2, (
      'error: --config.train.nan_policy: its config file lacks the field, which the default config has: a '
      "file of an older version, or a group assigned whole? Start from configs/default.py's get_config() and "
      'set fields on it\n'))


@pytest.mark.parametrize('name', BAD_FLAGS)
def test_bad_config_is_exit_code_2_and_one_line(name, phantom_dir, tmp_path):
  overrides, message = BAD_FLAGS[name]
  result = _run(tmp_path / 'run', phantom_dir, *([overrides] if isinstance(overrides, str) else overrides))
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f'error: {message}')
  assert not (tmp_path / 'run').exists()  # stopped before anything was written


@pytest.mark.parametrize('name', BAD_VALUES)
def test_bad_config_values_are_one_line_config_errors(name):
  fields, message = BAD_VALUES[name]
  config = tiny.get_config()
  config.update_from_flattened_dict(fields)
  with pytest.raises(ConfigError, match=f'^{re.escape(message)}') as error:
    config_check.check_config(config, default.get_config(), 'train')
  assert '\n' not in str(error.value)


def test_what_is_in_the_way_of_a_folder_is_named(tmp_path):
  (tmp_path / 'notes.txt').write_text('')
  (tmp_path / 'old run').symlink_to(tmp_path / 'unmounted')
  assert config_check.file_in_the_way(tmp_path / 'new' / 'run') is None
  assert config_check.file_in_the_way(tmp_path / 'notes.txt' / 'run') == f'{tmp_path}/notes.txt is a file'
  assert config_check.file_in_the_way(tmp_path / 'old run' / 'slices') == (
      f'{tmp_path}/old run is a broken link (to {tmp_path}/unmounted)')


def test_a_workdir_part_of_another_kind_is_refused_before_anything_is_built(phantom_dir, tmp_path):
  """A file where a run keeps a folder (the slice store, which a rebuild would replace, losing the file; the
  checkpoints, found at the first save) or a folder where it keeps a file: one line, exit 2, nothing built
  and the user's file kept."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'slices').write_text('my notes')
  result = _run(workdir, phantom_dir, '--mode=preprocess')
  assert (result.returncode, result.stderr) == (
      2, f'error: --workdir={workdir}: {workdir}/slices is a file, where runs keep their own; move it away\n')
  assert os.listdir(workdir) == ['slices'] and (workdir / 'slices').read_text() == 'my notes'
  assert config_check.workdir_part_in_the_way(workdir, str(tmp_path / 'store')) is None  # not used then
  (workdir / 'slices').unlink()
  for name in ('checkpoints', 'eval', 'tensorboard'):
    (workdir / name).write_text('')
    assert config_check.workdir_part_in_the_way(workdir, '') == f'{workdir}/{name} is a file'
    (workdir / name).unlink()
  for name in ('metrics.jsonl', 'runs.jsonl', 'train.log', 'trained_on.json'):
    (workdir / name).mkdir()
    assert config_check.workdir_part_in_the_way(workdir, '') == f'{workdir}/{name} is a folder'
    (workdir / name).rmdir()
  assert config_check.workdir_part_in_the_way(workdir, '') is None


def test_the_package_runs_from_any_folder_with_the_projects_configs(tmp_path):
  """`python -m easunet_jax` is main.py (an installed easunet_jax has no main.py), and `--config=configs/...`,
  a sweep file and the configs it names are the project's from any working directory, unless that
  directory has such a file."""
  def run(*args):
    return subprocess.run([sys.executable, '-m', *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=600)

  result = run('easunet_jax', '--config=configs/tiny.py', '--mode=predict')
  assert (result.returncode, result.stderr.splitlines()[-1]) == (
      2, 'error: --mode=predict needs --input and --output'), result.stderr
  assert run('easunet_jax.models', '--config', 'configs/tiny.py').stdout.endswith('params: 5834\n')
  (tmp_path / 'configs').mkdir()  # a folder of the user's own configs, no package
  (tmp_path / 'configs' / 'tiny.py').write_text(
      'from configs import tiny\n\ndef get_config():\n  config = tiny.get_config()\n'
      '  config.model.features = (8, 16, 32)\n  return config\n')
  assert not run('easunet_jax.models', '--config=configs/tiny.py').stdout.endswith('params: 5834\n')
  sweep = run('easunet_jax.sweep', '--sweep=configs/sweep_ablation.py:demo', '--workdir=sweep', '--seeds=1',
              '--dry_run')
  assert sweep.returncode == 0, sweep.stderr
  assert f"{sys.executable} -m easunet_jax --config=configs/eas.py:demo --workdir={tmp_path / 'sweep'}" in (
      sweep.stdout)


def test_a_tilde_after_a_flags_equals_sign_is_the_home_folder(phantom_dir, tmp_path):
  """`--workdir=~/run` and `--config.data.cache_dir=~/store`, which no shell expands: the home folder's, not
  a folder named ~ in the current one (masks and reports went to both before)."""
  home = tmp_path / 'home'
  home.mkdir()
  command = [sys.executable, str(REPO / 'main.py'), f"--config={REPO / 'configs' / 'tiny.py'}",
             *_command('~/run', phantom_dir, '--mode=preprocess', '--config.data.cache_dir=~/store')[3:]]
  result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'HOME': str(home)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert (home / 'store' / 'fingerprint.json').exists() and not (tmp_path / '~').exists()


def test_a_file_given_for_a_folder_or_a_folder_for_a_file_is_one_line(phantom_dir, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('')
  model = notes / 'models' / 'm.npz'
  for workdir, flag in ((notes, f'--workdir={notes}'), (tmp_path / 'run', f'--output={model}')):
    result = _run(workdir, phantom_dir, *(['--mode=export', flag] if flag.startswith('--output') else []))
    assert result.returncode == 2
    assert result.stderr == f'error: {flag}: {notes} is a file; expected a folder (made if missing)\n'
  store = notes / 'slices'  # a folder the run makes, under the file
  result = _run(tmp_path / 'run', phantom_dir, '--mode=preprocess', f'--config.data.cache_dir={store}')
  assert result.returncode == 2
  assert result.stderr == (f"error: data.cache_dir: expected a folder (made if missing) or '', got "
                           f"'{store}': {notes} is a file\n")
  for folder in (tmp_path, f'{tmp_path}/new/'):  # one there, or one to make
    result = _run(tmp_path / 'run', phantom_dir, '--mode=export', f'--output={folder}')
    assert result.returncode == 2
    assert result.stderr == (f'error: --mode=export needs --output, the model file to write, e.g. '
                             f'model.npz; {folder} names a folder\n')
  assert not (tmp_path / 'new').exists()


def test_export_writes_over_no_scan_label_map_or_other_data(tmp_path):
  """--output of another mode's habit (a scan, a label map) or a file of other data is refused; a model file
  is written over."""
  scan, data, model = tmp_path / 'knee.nii.gz', tmp_path / 'data.npz', tmp_path / 'model.npz'
  scan.write_bytes(b'a scan')
  np.savez(data, x=np.zeros(3))
  for output, why in ((scan, 'expected a model file name ending in .npz'),
                      (data, 'a file that is not a model file of easunet_jax, which export would overwrite; '
                             'name another')):
    with pytest.raises(ConfigError, match=f'^--output={re.escape(str(output))}: {re.escape(why)}$'):
      config_check.check_export_output(str(output))
  model.symlink_to(pretrained.SHIPPED)
  config_check.check_export_output(str(model))


@pytest.mark.parametrize('mode, filename', [('train', ('/data/run/checkpoints/4',)), ('train', ()),
                                            ('export', ())], ids=['file', 'no-file', 'export-no-file'])
def test_a_full_disk_is_one_line_not_a_traceback(phantom_dir, tmp_path, mode, filename):
  output = tmp_path / 'model.npz'
  flags = [f'--mode={mode}', *([f'--output={output}'] * (mode == 'export'))]
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)  # a workdir trained, for export to read
  result = _run(tmp_path / 'run', phantom_dir, *flags, hook=DISK_FULL.format(filename=filename))
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  # Without a file named, the run's own output: training's workdir, an export's model file.
  where = filename[0] if filename else {'train': tmp_path / 'run', 'export': output}[mode]
  assert result.stderr.splitlines()[-1] == f'error: {where}: No space left on device'


def test_a_training_stopped_by_a_users_error_logs_its_line(phantom_dir, tmp_path):
  result = _run(tmp_path / 'run', phantom_dir, '--config.train.init_weights=/no/such/model.npz')
  assert result.returncode == 2 and result.stderr.splitlines()[-1] == (
      "error: train.init_weights: expected a model file (--mode=export), got '/no/such/model.npz', which is "
      'not a file')
  last, error = (tmp_path / 'run' / 'train.log').read_text().splitlines()[-1], result.stderr.splitlines()[-1]
  assert re.fullmatch(rf'E\d{{4}} [\d:.]+ \d+ train\.py:\d+\] {re.escape(error)}', last)


def test_help_exits_0_also_where_its_reader_stops_early():
  """--help (absl's exits 1) exits 0, as nnU-Net's; piped into a reader that stops early (`| head`), with no
  error (the OSError of the closed pipe once read as the config file's)."""
  shown = subprocess.run([sys.executable, 'main.py', '--help'], check=False, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert shown.returncode == 0 and '--mode' in shown.stdout, shown.stderr
  for unbuffered in ('1', ''):  # the closed pipe found by absl's write, or by the flush at the end
    with subprocess.Popen([sys.executable, 'main.py', '--help'], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'PYTHONUNBUFFERED': unbuffered}) as unread:
      unread.stdout.close()  # before the process writes: its first write finds the pipe closed
      assert unread.wait(timeout=600) == 0 and unread.stderr.read() == ''


def test_a_mistyped_workdir_is_one_line_and_makes_no_folders(tmp_path):
  """Evaluate, export and predict from a workdir that was never trained (a typo): the error alone, with no
  folder made for it (the compile cache beside it) nor in the folder it was started in."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  workdir = tmp_path / 'typo' / 'deeper' / 'run'
  # Predict's flags turned off explicitly (as a flag file shared by the modes may) are no error in evaluate.
  for mode in (['--mode=evaluate', '--nosave_probabilities', '--continue_prediction=false'],
               ['--mode=export', '--output=w.npz'],
               ['--mode=predict', '--input=scan.nii.gz', '--output=mask.nii.gz']):
    command = [sys.executable, str(REPO / 'main.py'), f"--config={REPO / 'configs' / 'tiny.py'}",
               f'--workdir={workdir}', *mode]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False, env=env)
    assert result.returncode != 0 and result.stderr == (
        f"error: no checkpoint in {workdir / 'checkpoints'}: train this workdir first\n"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], mode


def test_verbose_shows_the_traceback_of_a_bad_config(phantom_dir, tmp_path):
  result = _run(tmp_path / 'run', phantom_dir, '--config.train.nan_policy=ignore', '--verbose')
  assert result.returncode != 0 and 'Traceback' in result.stderr and 'train.nan_policy' in result.stderr


def test_predict_without_config_uses_the_shipped_model(tmp_path):
  """The user's first command: no training, no config; with expert labels to score against. Other modes
  without --config are one-line errors."""
  image, labels, affine = phantom.make_subject(11, (8, 96, 96), (8.0, 1.4, 1.4))
  volumes.save_volume(tmp_path / 'scan.nii.gz', image, affine)
  volumes.save_volume(tmp_path / 'labels.nii.gz', labels, affine)
  # From another directory, as a user would: the shipped model is found inside the package. Without a
  # cache chosen, its compiled programs go to the user's cache, not into the folder it was started in.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['XDG_CACHE_HOME'] = str(tmp_path / 'cache')
  result = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=predict', '--input=scan.nii.gz',
                           '--output=mask.nii.gz', '--labels=labels.nii.gz'], cwd=tmp_path,
                          capture_output=True, text=True, check=False, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert any((tmp_path / 'cache' / 'easunet_jax' / 'jax').iterdir())
  assert not (tmp_path / 'runs').exists()  # where a workdir's cache would have been
  mask = nib.load(tmp_path / 'mask.nii.gz')
  assert mask.shape == image.shape and np.allclose(mask.affine, affine)
  assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
  assert 'scan.nii.gz: knee of unknown side (undecided' in result.stdout and '; FC ' in result.stdout
  assert 'scan.nii.gz: against labels.nii.gz: Dice FC ' in result.stdout
  assert '3D Dice against the labels, 1 scan(s): FC ' in result.stdout
  for name in ('mask_measures.csv', 'mask_thickness.png', 'mask_slices.png', 'mask_scores.csv',
               'mask_bland_altman_thickness.png'):
    assert (tmp_path / name).exists()
  refused = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=train'],
                           capture_output=True, text=True, check=False)
  assert refused.returncode == 2 and refused.stderr.startswith('error: --config is needed')
  # A config field without --config: absl knows no such flag; the shipped model's config is named.
  refused = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=predict', '--input=scan.nii.gz',
                            '--output=mask.nii.gz', "--config.data.label_map=((1, 1), (2, 2))"], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
  assert refused.returncode == 2 and refused.stderr == (
      'error: --config.data.label_map: a config field, set only beside --config=<file> (to predict with the '
      f"shipped model: --config={REPO / 'configs' / 'eas.py'}:knee --weights={pretrained.SHIPPED})\n")
  # A workdir beside no --config, or beside a model file: its model would go unused.
  for flags, message in (
      ([], '--workdir=runs/tiny: predict from a workdir needs the --config it was trained with (without '
           '--config and --weights, predict uses the shipped model)'),
      (['--weights=mine.npz'], '--workdir=runs/tiny and --weights=mine.npz name two models: give one')):
    refused = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=predict', '--input=scan.nii.gz',
                              '--output=mask.nii.gz', '--workdir=runs/tiny', *flags], cwd=tmp_path,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and refused.stderr == f'error: {message}\n'
  # Beside a model file of one's own, its training's config (the shipped one's would not fit its network).
  refused = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=predict', '--input=scan.nii.gz',
                            '--config.predict.zoom=1', '--weights=mine.npz', '--output=mask.nii.gz'],
                           cwd=tmp_path, capture_output=True, text=True, check=False)
  assert refused.returncode == 2 and refused.stderr == (
      'error: --config.predict.zoom: a config field, set only beside --config=<file> (beside '
      '--weights=mine.npz: the config file it was trained with)\n')
  # absl's other spellings of --config (one dash, a --flagfile) give the override its config.
  (tmp_path / 'flags.txt').write_text(f"--config={REPO / 'configs' / 'tiny.py'}\n")
  for spelling in (f"-config={REPO / 'configs' / 'tiny.py'}", f"--flagfile={tmp_path / 'flags.txt'}"):
    refused = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=preprocess', spelling,
                              '--config.data.root=no_such_folder'], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith('error: data.root: expected a dataset')


def test_a_cache_folder_that_cannot_be_made_is_one_warning(tmp_path):
  """XDG_CACHE_HOME where nothing can be made (a read-only home on a cluster node; here, under a file): one
  line for the compiled programs, which are then not kept, and no warnings of JAX at each program it
  compiles, nor of matplotlib, whose font cache is there too."""
  (tmp_path / 'afile').write_text('')
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_COMPILATION_CACHE_DIR', 'MPLCONFIGDIR')}
  env['XDG_CACHE_HOME'] = str(tmp_path / 'afile' / 'cache')
  result = subprocess.run([sys.executable, '-c', _RUN_MAIN.format(hook=COMPILE_IN_PREDICT), '--mode=predict',
                           '--input=scan.nii.gz', '--output=out'], cwd=REPO, capture_output=True, text=True,
                          check=False, env=env)
  assert (result.returncode, result.stdout) == (0, '2\n'), result.stderr[-2000:]
  [warning] = [line for line in result.stderr.splitlines() if not line.startswith('I')]
  cache = tmp_path / 'afile' / 'cache' / 'easunet_jax' / 'jax'
  assert warning.endswith(
      f'] {cache}: compiled programs cannot be kept there (Not a directory), so each run compiles them '
      'again; set JAX_COMPILATION_CACHE_DIR to a folder that can be written, or XDG_CACHE_HOME'), (
          result.stderr)


@pytest.mark.skipif(any(pathlib.Path('/dev').glob('nvidia[0-9]*')), reason='a GPU node')
def test_platforms_that_cannot_start_are_one_line(tmp_path):
  """JAX_PLATFORMS=cuda on a node without a GPU (a batch job on a CPU node): JAX fails a bare assertion at
  its first call; the user hears which setting and what to do."""
  result = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=predict', '--input=scan.nii.gz',
                           '--output=out'], cwd=tmp_path, capture_output=True, text=True, check=False,
                          env={**os.environ, 'JAX_PLATFORMS': 'cuda'})
  assert (result.returncode, result.stderr) == (2, (
      'error: JAX found no backend for JAX_PLATFORMS=cuda (no NVIDIA GPU is visible); unset JAX_PLATFORMS, '
      'or install jax with CUDA on a GPU node\n'))


@pytest.mark.parametrize('given', [False, True])
def test_predict_gets_the_model_file_and_the_side_given(tmp_path, given):
  """--weights names the model file, also beside a --config (whose predict settings it then takes; without
  either, the shipped model), and --laterality=right reaches predict as 'R'."""
  (tmp_path / 'model.npz').symlink_to(pretrained.SHIPPED)
  flags = ['--config=configs/tiny.py', '--weights=' + str(tmp_path / 'model.npz'),
           '--laterality=right'] if given else []
  result = subprocess.run([sys.executable, '-c', _RUN_MAIN.format(hook=REPORT_PREDICT), '--mode=predict',
                           '--input=scan.nii.gz', '--output=mask.nii.gz', *flags], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  model, side = (tmp_path / 'model.npz', 'R') if given else (pretrained.SHIPPED, None)
  assert result.stdout.splitlines()[-1] == f'predict None {model} {side}'


@pytest.mark.parametrize('stop', ['SIGINT', 'SIGTERM'])
def test_a_stop_that_a_callback_swallows_still_ends_the_process(stop, tmp_path):
  """Ctrl-C or SIGTERM whose exception a callback swallowed, the work hanging: the watchdog ends the process
  with the signal's exit code and one line."""
  result = subprocess.run([sys.executable, '-c', _RUN_MAIN.format(hook=SWALLOWED_STOP.format(signal=stop)),
                           '--mode=predict', '--input=scan.nii.gz', f'--output={tmp_path}/mask.nii.gz'],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
  assert (result.returncode, result.stderr.splitlines()[-1]) == (128 + signal.Signals[stop], (
      f'stopped ({"Ctrl-C" if stop == "SIGINT" else stop}): the work had not ended 2 s after the signal; '
      'ended now')), result.stderr[-2000:]


@pytest.mark.parametrize('stop', ['SIGINT', 'SIGTERM'])
def test_a_stop_of_a_predict_batch_is_one_line_and_keeps_the_scans_done(stop, augmented_tiny, tmp_path):
  """Ctrl-C, or a scheduler's SIGTERM (a batch job's time limit)."""
  config, workdir, _ = augmented_tiny
  # A model that compiles in seconds, trained (as its file says) on several hosts: predict runs alone.
  distributed = config.copy_and_resolve_references()
  distributed.train.distributed = True
  pretrained.export(distributed, workdir, tmp_path / 'tiny.npz')
  for i in range(2):
    image, _labels, affine = phantom.make_subject(20 + i, (8, 64, 64), (8.0, 2.0, 2.0))
    volumes.save_volume(tmp_path / 'in' / f'knee_{i}.nii.gz', image, affine)
  hook = SIGNAL_AT_SECOND_SCAN.format(signal=stop)
  result = subprocess.run([sys.executable, '-c', _RUN_MAIN.format(hook=hook), '--mode=predict',
                           f'--weights={tmp_path / "tiny.npz"}', f'--input={tmp_path / "in"}',
                           f'--output={tmp_path / "out"}'],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 128 + signal.Signals[stop], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stderr.splitlines()[-1].startswith(
      f'stopped ({"Ctrl-C" if stop == "SIGINT" else stop}): the scans finished are in --output')
  assert (tmp_path / 'out' / 'knee_0.nii.gz').exists() and not (tmp_path / 'out' / 'knee_1.nii.gz').exists()
  assert 'knee_0' in (tmp_path / 'out' / 'measures.csv').read_text()
