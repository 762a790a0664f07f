"""Runs a sweep file and gathers its results into one Table-1-shaped table.

  python -m easunet_jax.sweep --sweep=configs/sweep_table1.py[:ARG] --workdir=W [--seeds=3]
      [--devices_per_run=1] [--dry_run] [--config.<field>=<value> ...]

A sweep file defines `sweep(add)` (flax-examples style) and calls `add(name, config, title, **fields)` once
per variant: a config file (`:ARG` of the sweep is passed on to it, e.g. `:demo`) and field overrides such as
`**{'model.eca': False}`. Each variant runs with seeds 0..N-1; each such point trains and then evaluates as its
own `main.py` process in W/<variant>_seed<s>, with every `--config.*` flag of the command line passed on.
Points run one at a time on CPU and one per group of `--devices_per_run` GPUs at once where there are more.
A point whose evaluation of the same config exists is skipped; an unfinished one resumes from its newest
checkpoint (main.py does that). A failed point does not stop the others; it is named in the table and the
sweep exits non-zero at the end. SIGTERM or Ctrl-C stops the sweep: the running points save a checkpoint
and stop, and the same command goes on from there. The points share main.py's compilation cache
(W/.jax_cache).

Every point sees the same subjects: the sweep writes W/splits.json once (unless data.split_file is given),
and it builds the slice stores before any run starts, so that no two processes ever write one store.
Results: W/table.md and W/table.csv (per variant and cartilage, mean ± sample std over seeds of each run's
test-set mean, 2D per cartilage slice as the paper's Table 1 and 3D per volume) and W/dice.png.
"""

import concurrent.futures
import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import matplotlib
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

# metrics imports jax, but nothing here calls it, so no backend (no GPU) is claimed by this process.
from easunet_jax import metrics
from easunet_jax.data import preprocess, volumes

matplotlib.use('Agg')  # files only: no display on servers and CI
import matplotlib.pyplot as plt

flags.DEFINE_string('sweep', None, 'Sweep file defining sweep(add), e.g. configs/sweep_table1.py[:demo].')
flags.DEFINE_string('workdir', None, 'Sweep directory: one sub-folder per point, the tables beside them.')
flags.DEFINE_integer('seeds', 3, 'Seeds 0..N-1 of each variant.', lower_bound=1)
flags.DEFINE_integer('devices_per_run', 1, 'GPUs per point; points run at once on separate GPU groups.',
                     lower_bound=1)
flags.DEFINE_bool('dry_run', False, 'List the points, their state and their commands; run nothing.')
flags.mark_flags_as_required(['sweep', 'workdir'])
FLAGS = flags.FLAGS

MAIN = pathlib.Path(__file__).resolve().parents[1] / 'main.py'
# Fields the sweep sets for every point: a user value would break the seeds or the shared slice stores.
_SWEEP_FIELDS = ('seed', 'data.cache_dir')
# The columns of the paper's Table 1 plus HD95, and their headers; evaluate.py's metrics.json holds them.
_COLUMNS = {'dice': 'DSC %', 'precision': 'Precision %', 'recall': 'Recall %', 'hd': 'HD mm', 'hd95': 'HD95 mm'}
_CLASSES = ('fc', 'tc')
_PROTOCOLS = {'2d': "2D, per slice with cartilage (the paper's Table 1 protocol)", '3d': '3D, per volume'}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str  # folder prefix of its points
  title: str  # the table's model column
  config: str  # config file[:arg], as main.py's --config
  overrides: tuple[str, ...]  # its --config.<field>=<value> flags


@dataclasses.dataclass(frozen=True)
class Point:
  variant: Variant
  seed: int

  @property
  def name(self) -> str:
    return f'{self.variant.name}_seed{self.seed}'


def _flag(field: str, value) -> str:
  """--config.<field>=<value> in the syntax config_flags parses (strings bare, the rest as literals)."""
  return f'--config.{field}={value if isinstance(value, str) else repr(value)}'


def load_sweep(spec: str) -> list[Variant]:
  """The variants that `sweep(add)` of the file `spec` (`path[:arg]`) adds."""
  path, _, arg = spec.partition(':')
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f'--sweep: no file {path}')
  module_spec = importlib.util.spec_from_file_location('sweep_file', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  variants = []

  def add(name: str, config: str, title: str = '', **fields) -> None:
    if not re.fullmatch(r'[\w.-]+', name):
      raise ValueError(f'{path}: variant name {name!r} is not a folder name (letters, digits, _ . -)')
    if arg and ':' in config:
      raise ValueError(f'{path}: variant {name} names config {config} with an argument, and the sweep has :{arg}')
    variants.append(Variant(name, title or name, f'{config}:{arg}' if arg else config,
                            tuple(_flag(k, v) for k, v in fields.items())))

  module.sweep(add)
  names = [v.name for v in variants]
  if not names or len(set(names)) != len(names):
    raise ValueError(f'{path}: sweep(add) must add at least one variant and no name twice, got {names}')
  return variants


def point_args(point: Point, workdir: pathlib.Path, overrides: Sequence[str]) -> list[str]:
  """main.py's arguments for `point` (without --mode): the user's overrides, then the variant's, then the
  sweep's own (seed, the shared split and slice store)."""
  args = [f'--config={point.variant.config}', f'--workdir={workdir / point.name}', *overrides,
          *point.variant.overrides, f'--config.seed={point.seed}',
          f'--config.data.cache_dir={workdir / "slices" / f"seed{point.seed}"}']
  if not any(o.startswith('--config.data.split_file=') for o in overrides):
    args.append(f'--config.data.split_file={workdir / "splits.json"}')
  return args


def load_config(args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config main.py builds from `args`, parsed the same way (config_flags, locked)."""
  argv = [str(MAIN), *(a for a in args if a.startswith('--config'))]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise ValueError(f'{args[0]}: {e}') from None
  return flag_values.config


def evaluation(point_dir: pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path | None:
  """The newest eval/<step>/metrics.json in `point_dir` written with exactly `config`, else None."""
  wanted = json.loads(config.to_json())

  def written_with_config(path: pathlib.Path) -> bool:
    try:
      return json.loads(path.read_text()).get('config') == wanted
    except json.JSONDecodeError:  # cut short by a killed evaluation
      return False

  found = [p for p in point_dir.glob('eval/*/metrics.json') if written_with_config(p)]
  return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def device_groups(devices_per_run: int) -> list[str | None]:
  """CUDA_VISIBLE_DEVICES values of the points that may run at once: the GPUs visible to this process
  (nvidia-smi, so that this process claims none) in groups of `devices_per_run`; [None] without GPUs."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    gpus = [g.strip() for g in visible.split(',') if g.strip()]
  else:
    try:
      listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
      listing = ''
    gpus = [str(i) for i in range(sum(row.startswith('GPU ') for row in listing.splitlines()))]
  if not gpus:
    return [None]
  if devices_per_run > len(gpus):
    raise ValueError(f'--devices_per_run={devices_per_run}, but only {len(gpus)} GPUs are visible')
  if len(gpus) % devices_per_run:
    logging.warning('%d GPUs in groups of %d: GPUs %s stay idle', len(gpus), devices_per_run,
                    ','.join(gpus[len(gpus) // devices_per_run * devices_per_run:]))
  return [','.join(gpus[i:i + devices_per_run]) for i in range(0, len(gpus) - devices_per_run + 1, devices_per_run)]


def _write_split(config: ml_collections.ConfigDict, point_dir: pathlib.Path, path: pathlib.Path) -> None:
  """The seeded subject split of data.root (or the phantom, generated here once) as a data.split_file.
  Every labelled case is split; the stores drop the ones their checks reject."""
  root = preprocess.resolve_data_root(config.data, point_dir, config.seed)
  ids = [case.id for case in volumes.discover_cases(root) if case.label is not None]
  if not ids:
    raise volumes.DataError(f'{root}: no labelled case to split')
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
  tmp.write_text(json.dumps(preprocess.split_cases(ids, config.data.split, config.seed), indent=1))
  tmp.rename(path)
  logging.info('sweep split written to %s', path)


def prepare_shared_data(points: Sequence[Point], configs: dict[Point, ml_collections.ConfigDict],
                        workdir: pathlib.Path) -> None:
  """The sweep's split file (unless data.split_file names the user's) and the slice stores of `points`,
  each written once, by this process."""
  split_file = pathlib.Path(configs[points[0]].data.split_file)
  if split_file == workdir / 'splits.json' and not split_file.exists():
    first = min(configs, key=lambda p: p.seed)  # the split of the lowest seed, whichever points run now
    _write_split(configs[first], workdir / first.name, split_file)
  # One store per seed: the store's fingerprint includes config.seed, so points of different seeds
  # cannot share one without rebuilding it under each other's feet.
  stores = {}
  for point in points:
    stores.setdefault(configs[point].data.cache_dir, point)
  for point in stores.values():
    preprocess.prepare_data(configs[point], workdir / point.name)


def _check_same_data(configs: dict[Point, ml_collections.ConfigDict]) -> None:
  """A sweep compares its points on one data set: no variant may change a data field."""
  def data_of(config):
    return {k: v for k, v in config.data.to_dict().items() if k != 'cache_dir'}

  points = list(configs)
  reference = data_of(configs[points[0]])
  for point in points[1:]:
    differ = sorted(k for k, v in data_of(configs[point]).items() if v != reference[k])
    if differ:
      raise ValueError(f'variant {point.variant.name} changes data.{", data.".join(differ)}: all points of a '
                       'sweep must see the same data')


def _last_line(path: pathlib.Path) -> str:
  lines = [line for line in path.read_text(errors='replace').splitlines() if line.strip()]
  return lines[-1] if lines else ''


class _Launcher:
  """Runs points, one per device group at a time, each in its own session so that a terminal's Ctrl-C
  reaches the sweep only. SIGTERM or SIGINT to the sweep is passed on once to the running points (main.py
  then saves a checkpoint after the step in flight and exits) and stops the sweep: no point is evaluated
  or started after it, and the same command resumes. A second signal passed on kills the points."""

  def __init__(self, groups: Sequence[str | None], workdir: pathlib.Path):
    self.groups, self.workdir = groups, workdir
    self.free = queue.SimpleQueue()
    for group in groups:
      self.free.put(group)
    self.stopped_by = ''  # the signal's name once one came
    self.running: set[subprocess.Popen] = set()
    self.lock = threading.Lock()

  def _pass_on(self, signum: int, frame) -> None:
    del frame
    self.stopped_by = signal.Signals(signum).name
    with self.lock:
      for process in self.running:
        process.send_signal(signum)

  def run(self, points: Sequence[Point], args: dict[Point, list[str]]) -> dict[Point, str]:
    """Runs `points`; returns why each one that did not finish failed."""
    start = time.monotonic()

    def run_numbered(numbered: tuple[int, Point]) -> str | None:
      i, point = numbered
      group = self.free.get()
      try:
        if self.stopped_by:
          return f'not started, the sweep was stopped by {self.stopped_by}'
        where = f' on GPUs {group}' if group is not None else ''
        logging.info('sweep [%d/%d] %s started%s', i, len(points), point.name, where)
        began = time.monotonic()
        error = self._run_point(point, args[point], group)
        logging.info('sweep [%d/%d] %s %s in %.0f s (sweep %.0f s)', i, len(points), point.name,
                     f'FAILED: {error}' if error else 'finished', time.monotonic() - began,
                     time.monotonic() - start)
        return error
      finally:
        self.free.put(group)

    previous = {s: signal.signal(s, self._pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      with concurrent.futures.ThreadPoolExecutor(len(self.groups)) as pool:
        errors = list(pool.map(run_numbered, enumerate(points, 1)))
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    return {point: error for point, error in zip(points, errors) if error}

  def _run_point(self, point: Point, args: Sequence[str], group: str | None) -> str | None:
    """Trains (or resumes) and evaluates `point` on the GPUs of `group` (None: the default devices), its
    output appended to <point>/sweep.log; None on success, else why it failed."""
    env = dict(os.environ)
    if group is not None:
      env['CUDA_VISIBLE_DEVICES'] = group
    log_path = self.workdir / point.name / 'sweep.log'
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for mode in ('train', 'evaluate'):
      with log_path.open('a') as log, self.lock:
        process = subprocess.Popen([sys.executable, str(MAIN), *args, f'--mode={mode}'], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running.add(process)
        if self.stopped_by:  # the signal came while it started
          process.send_signal(signal.SIGTERM)
      status = process.wait()
      with self.lock:
        self.running.discard(process)
      if self.stopped_by:  # main.py exits 0 after saving: a stopped training must not be evaluated
        return f'stopped by {self.stopped_by} in {mode}; run the same command to resume'
      if status:
        return f'{mode} exited with status {status}: {_last_line(log_path)} (log: {log_path})'
    return None


def summarize(variants: Sequence[Variant], points: Sequence[Point],
              evaluations: dict[Point, pathlib.Path | None]) -> list[dict]:
  """Rows of the table: per protocol, cartilage and variant, the mean and sample std over seeds of each
  run's test-set mean of every column, and the number of seeds that finished."""
  results = {p: json.loads(path.read_text()) for p, path in evaluations.items() if path is not None}
  rows = []
  for protocol in _PROTOCOLS:
    for cartilage in _CLASSES:
      for variant in variants:
        runs = [results[p] for p in points if p.variant == variant and p in results]
        row = {'protocol': protocol, 'cartilage': cartilage, 'variant': variant.name, 'model': variant.title,
               'seeds': len(runs)}
        for column in _COLUMNS:
          # metrics.json writes an undefined mean (a distance with no non-empty case) as null.
          values = [run[protocol][cartilage][column]['mean'] for run in runs]
          stats = metrics.summarize([np.nan if v is None else v for v in values])
          row[f'{column}_mean'], row[f'{column}_std'] = stats['mean'], stats['std']
        rows.append(row)
  return rows


def _cell(mean: float, std: float) -> str:
  if math.isnan(mean):
    return 'n/a'
  return f'{mean:.2f}' + ('' if math.isnan(std) else f' ± {std:.2f}')


def write_table(rows: Sequence[dict], failures: dict[Point, str], sweep: str, workdir: pathlib.Path) -> None:
  """table.md (Table-1-shaped, one section per protocol), table.csv (the same rows) and dice.png."""
  lines = [f'# Sweep `{sweep}`', '',
           ("Mean ± sample std over seeds of each run's test-set mean (`<point>/eval/<step>/metrics.json`); "
            '*Seeds* counts the runs that finished. HD and HD95 average the cases where both masks are '
            'non-empty.'), '']
  for protocol, title in _PROTOCOLS.items():
    lines += [f'## {title}', '', '| Cartilage | Model | Seeds | ' + ' | '.join(_COLUMNS.values()) + ' |',
              '|---|---|---|' + '---|' * len(_COLUMNS)]
    lines += [f"| {r['cartilage'].upper()} | {r['model']} | {r['seeds']} | " +
              ' | '.join(_cell(r[f'{c}_mean'], r[f'{c}_std']) for c in _COLUMNS) + ' |'
              for r in rows if r['protocol'] == protocol]
    lines.append('')
  if failures:
    lines += ['## Failed points', ''] + [f'- `{p.name}`: {error}' for p, error in failures.items()] + ['']
  (workdir / 'table.md').write_text('\n'.join(lines))
  with open(workdir / 'table.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  _plot_dice([r for r in rows if r['protocol'] == '2d'], workdir / 'dice.png')


def _plot_dice(rows: Sequence[dict], out: pathlib.Path) -> None:
  """Bars of each variant's 2D Dice, FC and TC side by side, with the std over seeds as error bars."""
  models = list(dict.fromkeys(r['model'] for r in rows))
  x = np.arange(len(models))
  fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(models)), 4), dpi=120)
  for offset, cartilage in ((-0.2, 'fc'), (0.2, 'tc')):
    chosen = [r for r in rows if r['cartilage'] == cartilage]
    ax.bar(x + offset, [r['dice_mean'] for r in chosen], width=0.4, label=cartilage.upper(),
           yerr=[0 if math.isnan(r['dice_std']) else r['dice_std'] for r in chosen], capsize=3)
  ax.set_xticks(x, models, rotation=20, ha='right')
  ax.set_ylabel('DSC % (2D, per cartilage slice)')
  ax.set_title('Test-set Dice, mean ± std over seeds')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def _dry_run(points: Sequence[Point], args: dict[Point, list[str]],
             evaluations: dict[Point, pathlib.Path | None]) -> None:
  for point in points:
    state = f'done ({evaluations[point]})' if evaluations[point] else 'to run'
    print(f'{point.name}: {state}')
    for mode in ('train', 'evaluate'):
      print('  ' + shlex.join([sys.executable, str(MAIN), *args[point], f'--mode={mode}']))


def run_sweep(spec: str, workdir: pathlib.Path, seeds: int, devices_per_run: int, dry_run: bool,
              overrides: Sequence[str]) -> bool:
  """Runs the sweep `spec` in `workdir` (see the module docstring); True when every point finished."""
  for field in _SWEEP_FIELDS:
    if any(o.startswith(f'--config.{field}=') for o in overrides):
      raise ValueError(f'--config.{field}: the sweep sets it for each point (seeds 0 .. --seeds - 1, one '
                       'slice store per seed)')
  variants = load_sweep(spec)
  points = [Point(v, seed) for v in variants for seed in range(seeds)]
  args = {p: point_args(p, workdir, overrides) for p in points}
  configs = {p: load_config(args[p]) for p in points}
  _check_same_data(configs)
  evaluations = {p: evaluation(workdir / p.name, configs[p]) for p in points}
  if dry_run:
    _dry_run(points, args, evaluations)
    return True
  todo = [p for p in points if evaluations[p] is None]
  for point in points:
    if evaluations[point]:
      logging.info('sweep: %s finished before (%s), skipped', point.name, evaluations[point])
  logging.info('sweep %s: %d points, %d finished before, %d to run', spec, len(points),
               len(points) - len(todo), len(todo))
  failures = {}
  if todo:
    groups = device_groups(devices_per_run)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_shared_data(todo, configs, workdir)
    failures = _Launcher(groups, workdir).run(todo, args)
    evaluations.update({p: evaluation(workdir / p.name, configs[p]) for p in todo})
  failures.update({p: 'no evaluation written' for p in points if evaluations[p] is None and p not in failures})
  write_table(summarize(variants, points, evaluations), failures, spec, workdir)
  logging.info('sweep table written to %s', workdir / 'table.md')
  for point, error in failures.items():
    logging.error('sweep point %s failed: %s', point.name, error)
  return not failures


def main(argv: Sequence[str], overrides: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]} (pass config fields as --config.<field>=<value>)')
  try:
    finished = run_sweep(FLAGS.sweep, pathlib.Path(FLAGS.workdir).absolute(), FLAGS.seeds,
                         FLAGS.devices_per_run, FLAGS.dry_run, overrides)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if not finished:
    sys.exit(1)


if __name__ == '__main__':
  # The --config.* flags belong to the points; absl would reject them as this program's flags.
  config_overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  app.run(functools.partial(main, overrides=config_overrides),
          argv=[a for a in sys.argv if not a.startswith('--config.')])
