"""Sweep runner: a dry run's points and commands, the fields it refuses, and a real two-seed sweep of tiny
runs that is stopped as its second point starts, re-run beside a failing variant, and re-run once more (the
re-runs in this process: the command line's part is the first run's and the dry run's)."""

import csv
import json
import logging
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import logging as absl_logging

from easunet_jax import figures
from easunet_jax.errors import ConfigError
from easunet_jax.sweep import launch, points, run, table

TINY = "def sweep(add):\n  add('tiny', 'configs/tiny.py', 'Tiny EAS U-Net')\n"
# A file to start from that is there (the config passes the sweep's checks) but no model file: the point
# fails in its own process, at start-up.
BROKEN = "  add('broken', 'configs/tiny.py', 'Broken', **{'train.init_weights': 'main.py'})\n"
TIMEOUT_S = 900


def _command(sweep_file, workdir, *args) -> list[str]:
  return [sys.executable, '-m', 'easunet_jax.sweep', f'--sweep={sweep_file}', f'--workdir={workdir}', *args]


class _Log(logging.Handler):
  """The messages of absl's logger, as the sweep's stderr would show them."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.text = ''

  def emit(self, record):
    self.text += record.getMessage() + '\n'


def _run_in_process(sweep_file, workdir) -> tuple[bool, str]:
  """`run.run_sweep` as the command line calls it with --seeds=2: (finished, its log)."""
  # The logger's own level, not absl's verbosity, is put back: restoring the verbosity would leave it a level
  # of its own, which a later test's caplog.at_level (of the root logger) no longer lowers.
  log, logger = _Log(), absl_logging.get_absl_logger()
  level = logger.level
  logger.addHandler(log)
  logger.setLevel(logging.INFO)
  try:
    return run.run_sweep(str(sweep_file), workdir, 2, 1, False, []), log.text
  finally:
    logger.setLevel(level)
    logger.removeHandler(log)


def _metrics(workdir, point) -> list:
  return sorted((workdir / point).glob('eval/*/metrics.json'))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The sweep folder and its three runs: stopped by SIGTERM as tiny_seed1 starts; re-run with a failing
  variant added; re-run again as it was."""
  root = tmp_path_factory.mktemp('sweep')
  workdir = root / 'W'
  tiny, with_broken = root / 'tiny.py', root / 'with_broken.py'
  tiny.write_text(TINY)
  with_broken.write_text(TINY.replace('\n', '\n' + BROKEN, 1))

  first = subprocess.Popen(_command(tiny, workdir, '--seeds=2'), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + TIMEOUT_S
  # tiny_seed1's log appears once tiny_seed0 is trained and evaluated, as the next point starts.
  while not (workdir / 'tiny_seed1' / 'sweep.log').exists() and first.poll() is None and (
      time.monotonic() < deadline):
    time.sleep(0.2)
  first.send_signal(signal.SIGTERM)
  first_stderr = first.communicate(timeout=TIMEOUT_S)[1]
  seed0_metrics = _metrics(workdir, 'tiny_seed0')
  mtimes = {p: p.stat().st_mtime_ns for p in seed0_metrics}

  second = _run_in_process(with_broken, workdir)
  after_second = {p: p.stat().st_mtime_ns for p in workdir.glob('*/eval/*/metrics.json')}
  table_after_second = (workdir / 'table.md').read_text()
  third = _run_in_process(tiny, workdir)
  return {'workdir': workdir, 'first': first, 'first_stderr': first_stderr, 'seed0_metrics': seed0_metrics,
          'mtimes': mtimes, 'second': second, 'after_second': after_second,
          'table_after_second': table_after_second, 'third': third}


def test_dry_run_lists_points_and_passes_overrides(tmp_path):
  dry = subprocess.run(_command('configs/sweep_table1.py', tmp_path / 'W', '--seeds=2', '--dry_run',
                                '--config.train.num_steps=7', "--config.model.features=(4, 8, 16, 32, 64)"),
                       capture_output=True, text=True, check=True)
  lines = dry.stdout.splitlines()
  points = [line.split(':')[0] for line in lines if not line.startswith(' ')]
  assert points == [f'{m}_seed{s}' for m in ('eas_unet', 'unet', 'unetpp', 'attention_unet') for s in (0, 1)]
  assert all(line.endswith(': to run') for line in lines if not line.startswith(' '))
  commands = [shlex.split(line) for line in lines if line.startswith(' ')]
  assert len(commands) == 16  # train and evaluate of each point
  for point, (train, evaluate) in zip(points, zip(commands[::2], commands[1::2])):
    seed = point[-1]
    assert train[-1] == '--mode=train' and evaluate[-1] == '--mode=evaluate' and train[:-1] == evaluate[:-1]
    assert f'--workdir={tmp_path / "W" / point}' in train
    assert '--config.train.num_steps=7' in train and '--config.model.features=(4, 8, 16, 32, 64)' in train
    assert f'--config.seed={seed}' in train
    assert f'--config.data.split_file={tmp_path / "W" / "splits.json"}' in train
    assert f'--config.data.cache_dir={tmp_path / "W" / "slices"}' in train
  assert not (tmp_path / 'W').exists()


def test_the_launcher_runs_one_point_per_device_group_at_once(monkeypatch, tmp_path):
  """Two groups, two points: both start together, each seeing only its group's devices."""
  script = ('import os, pathlib, sys, time; '
            "(pathlib.Path(sys.argv[1]) / f\"{os.environ['CUDA_VISIBLE_DEVICES']}@{time.time()}\").touch(); "
            'time.sleep(1.5)')
  monkeypatch.setattr(launch, 'main_command', lambda *_: [sys.executable, '-c', script, str(tmp_path)])
  two = [points.Point(points.Variant('v', 'v', 'configs/tiny.py', ()), seed) for seed in range(2)]
  assert not launch.Launcher(['0', '1,2'], tmp_path).run(two, {point: [] for point in two})
  starts = [path.name.split('@') for path in tmp_path.glob('*@*')]
  assert sorted({group for group, _ in starts}) == ['0', '1,2']
  first, second = sorted(float(t) for _, t in starts)[:2]
  assert second - first < 1.0  # at once, not one after the other


def test_a_failed_points_reason_is_its_own_error_line(monkeypatch, tmp_path):
  """main.py's one-line error, not the log's last line, nor an earlier run's error in the same log."""
  point = points.Point(points.Variant('v', 'v', 'configs/tiny.py', ()), 0)
  (tmp_path / point.name).mkdir()
  (tmp_path / point.name / 'sweep.log').write_text("error: an earlier run's\n")
  script = "print('error: this run', flush=True); print('I1206 a later line of another process'); exit(1)"
  monkeypatch.setattr(launch, 'main_command', lambda *_: [sys.executable, '-c', script])
  failures = launch.Launcher([None], tmp_path).run([point], {point: []})
  assert failures[point] == (f"train exited with status 1: error: this run (log: {tmp_path / point.name}/"
                             'sweep.log)')


def test_a_killed_sweeps_running_point_is_stopped(tmp_path):
  """SIGKILL to the sweep (which no handler sees) still reaches its running point as SIGTERM: it saves
  and stops, instead of training on in its own session."""
  point_script = ('import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, '
                  'lambda *_: (pathlib.Path(sys.argv[1]).touch(), sys.exit(0))); '
                  'pathlib.Path(sys.argv[2]).touch(); time.sleep(120)')
  stopped, started = tmp_path / 'stopped', tmp_path / 'started'
  sweep_script = (
      'import pathlib, sys\n'
      'from easunet_jax.sweep import launch, points\n'
      f'launch.main_command = lambda *_: [sys.executable, "-c", {point_script!r}, {str(stopped)!r}, '
      f'{str(started)!r}]\n'
      'point = points.Point(points.Variant("v", "v", "configs/tiny.py", ()), 0)\n'
      f'launch.Launcher([None], pathlib.Path({str(tmp_path)!r})).run([point], {{point: []}})\n')
  sweep = subprocess.Popen([sys.executable, '-c', sweep_script])
  deadline = time.monotonic() + 120
  while not started.exists() and sweep.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  sweep.kill()
  sweep.wait()
  deadline = time.monotonic() + 30
  while not stopped.exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert started.exists() and stopped.exists()


def test_a_split_file_of_the_user_or_the_config_file_is_the_points_split_not_the_sweeps(tmp_path, capsys):
  """The sweep's W/splits.json only where neither --config nor the variant's config file names a split."""
  mine = tmp_path / 'mine.json'
  mine.write_text('{}')
  config_file, sweep = tmp_path / 'split_config.py', tmp_path / 'sweep.py'
  config_file.write_text('from configs import tiny\n\ndef get_config():\n  c = tiny.get_config()\n'
                         f'  c.data.split_file = {str(mine)!r}\n  return c\n')
  sweep.write_text(f"def sweep(add):\n  add('own', {str(config_file)!r})\n")
  tiny = tmp_path / 'tiny_sweep.py'
  tiny.write_text(TINY)
  for spec, overrides in ((sweep, []), (tiny, [f'--config.data.split_file={mine}'])):
    assert run.run_sweep(str(spec), tmp_path / 'W', 1, 1, True, overrides)
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith(' ')]
    assert commands and all('splits.json' not in ' '.join(command) for command in commands)
    config = points.load_config(commands[0])
    assert config.data.split_file == str(mine)
  assert run.run_sweep(str(tiny), tmp_path / 'W', 1, 1, True, [])
  assert f'--config.data.split_file={tmp_path / "W" / "splits.json"}' in capsys.readouterr().out


def test_a_variant_setting_a_field_the_sweep_sets_is_refused(tmp_path):
  sweep = tmp_path / 'sweep.py'
  for field in points.SWEEP_FIELDS:
    sweep.write_text(f"def sweep(add):\n  add('v', 'configs/tiny.py', **{{{field!r}: 5}})\n")
    with pytest.raises(ConfigError, match=rf'^{sweep}: variant v sets {field}, which the sweep sets for each '
                       r'point \(seeds 0 \.\. --seeds - 1, one slice store for all\)$'):
      points.load_sweep(str(sweep))


def test_a_variants_config_file_lacking_fields_is_one_config_error(tmp_path):
  """A copy of an older version's config file: one line naming what it lacks, not a KeyError in a check."""
  old = tmp_path / 'old.py'
  old.write_text('import ml_collections\nfrom configs import tiny\n\ndef get_config():\n'
                 '  c = tiny.get_config()\n'
                 "  c.optim = ml_collections.ConfigDict({'lr': 0.01, 'momentum': 0.9})\n  return c\n")
  with pytest.raises(ConfigError, match=rf'^--config={old}: its config lacks 2 field\(s\) \(optim.schedule, '
                     r'optim.weight_decay\): a file of an older version'):
    points.load_config([f'--config={old}'])
  # A group the sweep's own override sets (data.cache_dir), assigned whole: absl fails on the override first.
  old.write_text('import ml_collections\nfrom configs import tiny\n\ndef get_config():\n'
                 '  c = tiny.get_config()\n'
                 "  c.data = ml_collections.ConfigDict({'root': '', 'split_file': ''})\n  return c\n")
  with pytest.raises(ConfigError, match=rf'^--config={old}: --config\.data\.cache_dir: its config file lacks '
                     'the field, which the default config has'):
    points.load_config([f'--config={old}', '--config.data.cache_dir=/W/slices'])


def test_a_sweep_files_argument_reaches_every_variants_config(tmp_path):
  """--sweep=<file>:demo trains each variant's config at its demo size, and refuses a variant whose config
  has an argument of its own."""
  sweep = tmp_path / 'sweep.py'
  sweep.write_text(TINY)
  assert [v.config for v in points.load_sweep(str(sweep))] == ['configs/tiny.py']
  assert [v.config for v in points.load_sweep(f'{sweep}:demo')] == ['configs/tiny.py:demo']
  sweep.write_text("def sweep(add):\n  add('a', 'configs/tiny.py:x')\n")
  with pytest.raises(ConfigError, match=r'variant a names config configs/tiny.py:x with an argument, and the '
                     'sweep has :demo$'):
    points.load_sweep(f'{sweep}:demo')


class _Process:
  def __init__(self):
    self.sent = []

  def send_signal(self, signum: int) -> None:
    self.sent.append(signum)


def test_a_closed_terminal_stops_the_points_as_sigterm_does(tmp_path):
  """SIGHUP reaches the running points as SIGTERM (they save and stop); SIGINT as itself. Each is the
  sweep's stop."""
  launcher, process = launch.Launcher([None], tmp_path), _Process()
  launcher.running.add(process)
  launcher._pass_on(signal.SIGHUP, None)
  assert process.sent == [signal.SIGTERM] and launcher.stopped_by == 'SIGHUP'
  launcher._pass_on(signal.SIGINT, None)
  assert process.sent == [signal.SIGTERM, signal.SIGINT] and launcher.stopped_by == 'SIGINT'


def test_a_variants_fields_win_over_the_users():
  """A user's flag for a field a variant sets (a model name, say) would make every variant the same one; of
  a tuple field, absl would join the two values into one network of both widths."""
  variant = points.Variant('v', 'v', 'configs/tiny.py', ('--config.train.num_steps=5',
                                                         '--config.model.features=(4, 8, 16)'))
  args = points.point_args(points.Point(variant, 2), pathlib.Path('/W'),
                           ['--config.train.num_steps=7', '--config.train.batch_size=2',
                            '--config.model.features=(2, 4)'])
  config = points.load_config(args)
  assert (config.train.num_steps, config.train.batch_size, config.seed) == (5, 2, 2)
  assert tuple(config.model.features) == (4, 8, 16)


def test_a_users_tuple_field_given_twice_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r'^--config\.model\.features is given 2 times \(\(2, 4\), then '
                     r'\(4, 8\)\), and absl would join them into one tuple; give it once$'):
    run.run_sweep('configs/sweep_table1.py', tmp_path, 1, 1, True,
                  ['--config.model.features=(2, 4)', '--config.model.features=(4, 8)'])


def test_a_config_file_that_does_not_load_is_one_config_error():
  with pytest.raises(ConfigError, match=r'^--config=no/such/config\.py: .*No such file') as error:
    points.load_config(['--config=no/such/config.py'])
  assert '\n' not in str(error.value)


def test_a_config_every_point_would_refuse_is_refused_before_anything_runs(tmp_path):
  other = "  add('other', 'configs/tiny.py', **{'model.name': 'no_such'})\n"
  (tmp_path / 'sweep.py').write_text(TINY + other)
  with pytest.raises(ConfigError, match=r'^variant other: model\.name'):
    run.run_sweep(str(tmp_path / 'sweep.py'), tmp_path / 'W', 1, 1, False, [])
  assert not (tmp_path / 'W').exists()
  (tmp_path / 'missing.py').write_text(TINY + "  add('moved', 'no/such/config.py')\n")
  with pytest.raises(ConfigError, match=r'^variant moved: --config=no/such/config\.py: .*No such file'):
    run.run_sweep(str(tmp_path / 'missing.py'), tmp_path / 'W', 1, 1, False, [])
  (tmp_path / 'notes.txt').write_text('')
  with pytest.raises(ConfigError, match=rf'^--workdir={tmp_path}/notes\.txt/W: {tmp_path}/notes\.txt is a '
                     r'file; expected a folder \(made if missing\)$'):
    run.run_sweep(str(tmp_path / 'sweep.py'), tmp_path / 'notes.txt' / 'W', 1, 1, False, [])
  with pytest.raises(ConfigError, match=r'--config.trian.num_steps: no such config field') as error:
    points.load_config(['--config=configs/tiny.py', '--config.trian.num_steps=3'])
  assert '\n' not in str(error.value)
  with pytest.raises(ConfigError, match=r'^--config=configs/tiny.py: --config.model.features.0: model.'
                     r'features is set whole, e.g. --config.model.features="\(32, 64, 128, 256, 512\)"$'):
    points.load_config(['--config=configs/tiny.py', '--config.model.features.0=8'])


@pytest.mark.parametrize('body', ['x = 1', 'sweep = 3', 'def sweep():\n  pass',
                                  'def sweep(add, more):\n  pass'])
def test_a_sweep_file_without_a_sweep_function_of_add_is_one_config_error(body, tmp_path):
  (tmp_path / 'sweep.py').write_text(body + '\n')
  with pytest.raises(ConfigError, match=r'sweep\.py: defines no function sweep\(add\) of one argument, add,'):
    points.load_sweep(str(tmp_path / 'sweep.py'))


def test_a_sweep_file_not_named_py_is_one_config_error(tmp_path):
  (tmp_path / 'sweep.txt').write_text("def sweep(add):\n  add('v', 'configs/tiny.py')\n")
  with pytest.raises(ConfigError, match=rf"^--sweep: {tmp_path / 'sweep.txt'} is not a Python file; "
                     r'a sweep is a \.py file defining sweep\(add\)$'):
    points.load_sweep(str(tmp_path / 'sweep.txt'))


def test_a_variant_name_that_is_no_string_is_one_config_error(tmp_path):
  (tmp_path / 'sweep.py').write_text("def sweep(add):\n  add(1, 'configs/tiny.py')\n")
  with pytest.raises(ConfigError, match=r"variant name 1 is not a folder name"):
    points.load_sweep(str(tmp_path / 'sweep.py'))


@pytest.mark.parametrize('flag, message', [
    ('--seeds=two', 'flag --seeds=two: invalid literal'),
    ('extra', "unexpected arguments ['extra']: every argument is a flag")])
def test_a_bad_flag_or_argument_is_one_line_and_exit_code_2(flag, message, tmp_path):
  result = subprocess.run(_command('configs/sweep_table1.py', tmp_path / 'W', flag), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 2 and result.stderr.startswith(f'error: {message}')
  assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize('override', ['--config.seed=1', '--config.data.cache_dir=/tmp/store'])
def test_fields_the_sweep_sets_are_refused(override, tmp_path):
  with pytest.raises(ConfigError, match='the sweep sets it'):
    run.run_sweep('configs/sweep_table1.py', tmp_path, 1, 1, True, [override])


def test_stopped_sweep_reruns_only_the_unfinished_point(runs):
  assert len(runs['seed0_metrics']) == 1, 'the first run was not stopped after its first point'
  assert runs['first'].returncode == 1
  assert 'sweep point tiny_seed1 failed: stopped by SIGTERM in train' in runs['first_stderr']
  second = runs['second'][1]
  assert 'tiny_seed0 finished before' in second and 'tiny_seed0 started' not in second
  assert 'tiny_seed1 started' in second and 'tiny_seed1 finished in' in second
  assert {p: p.stat().st_mtime_ns for p in runs['seed0_metrics']} == runs['mtimes']
  assert len(_metrics(runs['workdir'], 'tiny_seed1')) == 1
  assert json.loads((runs['workdir'] / 'splits.json').read_text())['test']


def test_failed_points_are_reported_and_the_others_finish(runs):
  (finished, log), table = runs['second'], runs['table_after_second']
  assert not finished
  for point in ('broken_seed0', 'broken_seed1'):
    assert f'sweep point {point} failed' in log
    # main.py's own one-line error, as the reason.
    assert re.search(f'`{point}`: train exited with status [1-9].*main.py: not a model file', table)


def test_rerun_skips_every_finished_point(runs):
  finished, log = runs['third']
  assert finished, log[-2000:]
  assert '2 points, 2 finished before, 0 to run' in log and 'started' not in log
  evaluations = runs['workdir'].glob('*/eval/*/metrics.json')
  assert {p: p.stat().st_mtime_ns for p in evaluations} == runs['after_second']


def test_a_point_trained_under_other_settings_is_refused_before_anything_runs(runs, tmp_path):
  """A variant whose training setting changed since its points trained: each would be resumed or taken as
  finished, and its model tabled under the new setting."""
  changed = tmp_path / 'changed.py'
  changed.write_text(TINY.replace("'Tiny EAS U-Net')", "'Tiny EAS U-Net', **{'optim.lr': 0.05})"))
  mtimes = {p: p.stat().st_mtime_ns for p in runs['workdir'].rglob('*') if p.is_file()}
  with pytest.raises(ConfigError, match=r'^sweep point tiny_seed0: .*/W/tiny_seed0 holds a training with '
                     r'optim\.lr=0\.01, and the sweep now asks for optim\.lr=0\.05; remove that folder'):
    run.run_sweep(str(changed), runs['workdir'], 2, 1, False, [])
  with pytest.raises(ConfigError, match=r'^sweep point tiny_seed0: '):  # as the run would: not "to run"
    run.run_sweep(str(changed), runs['workdir'], 2, 1, True, [])
  assert {p: p.stat().st_mtime_ns for p in runs['workdir'].rglob('*') if p.is_file()} == mtimes


def test_table_is_the_mean_and_std_over_seeds_of_each_evaluation(runs):
  workdir = runs['workdir']
  evaluations = [json.loads(_metrics(workdir, f'tiny_seed{s}')[0].read_text()) for s in (0, 1)]
  with open(workdir / 'table.csv') as f:
    rows = [r for r in csv.DictReader(f) if r['variant'] == 'tiny']
  assert [(r['protocol'], r['cartilage']) for r in rows] == [
      ('2d', 'fc'), ('2d', 'tc'), ('3d', 'fc'), ('3d', 'tc')]
  for row in rows:
    assert row['seeds'] == '2'
    for metric in ('dice', 'precision', 'recall', 'hd', 'hd95'):
      values = [e[row['protocol']][row['cartilage']][metric]['mean'] for e in evaluations]
      values = np.array([np.nan if v is None else v for v in values], np.float64)
      expected = (np.nanmean(values), np.std(values, ddof=1)) if not np.isnan(values).any() else None
      if expected:
        np.testing.assert_allclose([float(row[f'{metric}_mean']), float(row[f'{metric}_std'])], expected,
                                   rtol=1e-9)
  dice = rows[0]
  table = (workdir / 'table.md').read_text()
  assert (f"| FC | Tiny EAS U-Net | 2 | {float(dice['dice_mean']):.2f} ± {float(dice['dice_std']):.2f} |"
          in table)
  assert table.count('| Tiny EAS U-Net |') == 4
  assert '| FC | Broken | 0 | n/a |' in runs['table_after_second']
  assert (workdir / 'dice.png').stat().st_size > 0


def test_the_per_seed_stores_of_an_earlier_sweep_make_way_for_the_shared_one(tmp_path):
  for seed in (0, 1):
    (tmp_path / 'slices' / f'seed{seed}').mkdir(parents=True)
    (tmp_path / 'slices' / f'seed{seed}' / 'fingerprint.json').write_text('{}')
  (tmp_path / 'other' / 'seed0').mkdir(parents=True)  # a folder that holds more than stores is kept
  (tmp_path / 'other' / 'seed0' / 'fingerprint.json').write_text('{}')
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  run.remove_per_seed_stores(tmp_path / 'slices')
  run.remove_per_seed_stores(tmp_path / 'other')
  assert not (tmp_path / 'slices').exists() and (tmp_path / 'other' / 'notes.txt').exists()


def test_variants_of_one_title_get_a_bar_pair_each(tmp_path, monkeypatch):
  """Each variant's FC bar left of its TC bar, whatever order the rows come in."""
  drawn = []
  monkeypatch.setattr(figures, '_save', lambda fig, out, **layout: drawn.append(fig))
  dice = {('eas', 'fc'): 80.0, ('eas', 'tc'): 85.0, ('eas_sgd', 'fc'): 70.0, ('eas_sgd', 'tc'): 75.0}
  rows = [{'variant': variant, 'model': 'EAS U-Net', 'cartilage': cartilage, 'dice_mean': value,
           'dice_std': float('nan')} for (variant, cartilage), value in dice.items()]
  figures.dice_bars([rows[3], rows[0], rows[2], rows[1]], tmp_path / 'dice.png')  # eas_sgd first, TC first
  ax = drawn[0].axes[0]
  assert [label.get_text() for label in ax.get_xticklabels()] == ['EAS U-Net', 'EAS U-Net']
  assert sorted((round(bar.get_x() + bar.get_width() / 2, 2), bar.get_height()) for bar in ax.patches) == [
      (-0.2, 70.0), (0.2, 75.0), (0.8, 80.0), (1.2, 85.0)]
  assert [text.get_text() for text in ax.get_legend().get_texts()] == ['FC', 'TC']


def test_a_distance_undefined_in_some_seeds_says_how_many_it_averages(tmp_path, monkeypatch):
  """A seed whose test set had no case with both masks non-empty has no HD; the table's HD is the other
  seeds' mean, and says so; undefined in every seed, it is n/a. The figure draws the paper's protocol, 2D."""
  drawn = []
  monkeypatch.setattr(figures, 'dice_bars', lambda rows, path: drawn.append(rows))
  variant = points.Variant('v', 'V', 'configs/tiny.py', ())
  seeds = [points.Point(variant, s) for s in range(3)]
  for hds, want in (((4.0, None, 6.0), '5.00 ± 1.41 (2 of 3 seeds)'), ((None, None, None), 'n/a')):
    evaluations = {}
    for point, hd in zip(seeds, hds, strict=True):
      means = {column: {'mean': hd if column.startswith('hd') else 50.0} for column in table.COLUMNS}
      result = {protocol: {'fc': means, 'tc': means} for protocol in table.PROTOCOLS}
      evaluations[point] = tmp_path / f'{point.name}.json'
      evaluations[point].write_text(json.dumps(result))
    rows = table.table_rows([variant], seeds, evaluations)
    table.write_table(rows, {}, 'sweep.py', tmp_path)
    assert f'| FC | V | 3 | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 | {want} |' in (
        tmp_path / 'table.md').read_text()
    assert [(row['protocol'], row['cartilage']) for row in drawn.pop()] == [('2d', 'fc'), ('2d', 'tc')]


@pytest.mark.parametrize('visible, per_run, groups', [
    ('0,1,2,3', 2, ['0,1', '2,3']), ('4,5,6', 2, ['4,5']), ('0,1', 1, ['0', '1']), ('', 1, [None])])
def test_device_groups_split_the_visible_gpus(visible, per_run, groups, monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', visible)
  assert launch.device_groups(per_run) == groups
