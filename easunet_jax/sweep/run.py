"""Runs a sweep: its points (`points`) that have no evaluation yet, after the shared split and slice
store; the points themselves as processes (`launch`); then the table (`table`)."""

import contextlib
import json
import pathlib
import shlex
import shutil
from collections.abc import Iterator, Sequence

import ml_collections
from absl import logging

from configs import default
from easunet_jax import config_check, models, records
from easunet_jax.data import preprocess
from easunet_jax.errors import ConfigError
from easunet_jax.sweep import launch, table
from easunet_jax.sweep.points import SWEEP_FIELDS, Point, Variant, load_config, load_sweep, point_args


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


# Fields a point's trained weights do not depend on (paths the sweep sets, compute and bookkeeping): a
# re-run may change them and keep the point's training.
_NOT_TRAINED_WITH = ('name', 'data.cache_dir', 'data.split_file', 'data.workers', 'data.phantom_dir',
                     'model.depthwise_impl', 'train.distributed', 'eval.', 'predict.', 'checkpoint.', 'log.')


def _check_trained_as_asked(point: Point, point_dir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses a point whose folder holds a training under other settings than the sweep now gives it (a
  variant's or a --config field changed since): resumed or taken as finished, its model would be tabled
  under settings it was not trained with."""
  if (trained_config := records.last_config(point_dir)) is None:
    return
  trained = config_check.leaves(ml_collections.ConfigDict(trained_config))
  asked = config_check.leaves(ml_collections.ConfigDict(json.loads(config.to_json())))
  differ = [k for k, v in asked.items()
            if k in trained and trained[k] != v and not k.startswith(_NOT_TRAINED_WITH)]
  if differ:
    raise ConfigError(f'sweep point {point.name}: {point_dir} holds a training with '
                      f'{", ".join(f"{k}={trained[k]}" for k in differ)}, and the sweep now asks for '
                      f'{", ".join(f"{k}={asked[k]}" for k in differ)}; remove that folder to train the '
                      'point anew, or ask for what it was trained with')


def prepare_shared_data(points: Sequence[Point], configs: dict[Point, ml_collections.ConfigDict],
                        workdir: pathlib.Path) -> None:
  """The sweep's split file (unless data.split_file names the user's) and the slice store all `points`
  share, written once, by this process."""
  split_file = pathlib.Path(configs[points[0]].data.split_file)
  if split_file == workdir / 'splits.json' and not split_file.exists():
    first = min(configs, key=lambda p: p.seed)  # the split of the lowest seed, whichever points run now
    preprocess.write_split_file(configs[first], workdir / first.name, split_file)
  # One store for all points: with a split file, a store does not depend on the seed.
  remove_per_seed_stores(pathlib.Path(configs[points[0]].data.cache_dir))
  preprocess.prepare_data(configs[points[0]], workdir / points[0].name)


def remove_per_seed_stores(store: pathlib.Path) -> None:
  """Removes the stores <store>/seed<N> that a sweep of an earlier version kept, one per seed, where `store`
  holds nothing else, so that its shared store can be built in their place."""
  per_seed = [p for p in store.glob('seed*') if p.name[4:].isdigit() and (p / 'fingerprint.json').exists()]
  if per_seed and sorted(store.iterdir()) == sorted(per_seed):
    logging.info('%s: the per-seed slice stores of an earlier version of the sweep replaced by one shared '
                 'store', store)
    shutil.rmtree(store)


def _check_same_data(configs: dict[Point, ml_collections.ConfigDict]) -> None:
  """A sweep compares its points on one data set: no variant may change a data field, nor the network's
  stride, to which the shared slice store pads its slices."""
  def data_of(config):
    return {k: v for k, v in config.data.to_dict().items() if k != 'cache_dir'}

  points = list(configs)
  first = configs[points[0]]
  for point in points[1:]:
    config = configs[point]
    differ = sorted(k for k, v in data_of(config).items() if v != data_of(first)[k])
    if differ:
      raise ConfigError(f'variant {point.variant.name} changes data.{", data.".join(differ)}: all points of '
                        'a sweep must see the same data')
    if models.stride(config.model.features) != models.stride(first.model.features):
      raise ConfigError(f'variant {point.variant.name} has {len(config.model.features)} encoder stages, '
                        f'{points[0].variant.name} {len(first.model.features)}: the shared slice store pads '
                        "slices to one network stride")


@contextlib.contextmanager
def _of_variant(variant: Variant) -> Iterator[None]:
  """A ConfigError of the block names `variant`."""
  try:
    yield
  except ConfigError as e:
    raise ConfigError(f'variant {variant.name}: {e}') from None


def _dry_run(points: Sequence[Point], args: dict[Point, list[str]],
             evaluations: dict[Point, pathlib.Path | None]) -> None:
  for point in points:
    state = f'done ({evaluations[point]})' if evaluations[point] else 'to run'
    print(f'{point.name}: {state}')
    for mode in launch.MODES:
      print('  ' + shlex.join(launch.main_command(args[point], mode)))


def run_sweep(spec: str, workdir: pathlib.Path, seeds: int, devices_per_run: int, dry_run: bool,
              overrides: Sequence[str]) -> bool:
  """Runs the sweep `spec` in `workdir` (see the module docstring); True when every point finished."""
  for field in SWEEP_FIELDS:
    if any(o.startswith(f'--config.{field}=') for o in overrides):
      raise ConfigError(f'--config.{field}: the sweep sets it for each point (seeds 0 .. --seeds - 1, one '
                        'slice store for all)')
  config_check.check_given_once(overrides, default.get_config())
  if file := config_check.file_in_the_way(workdir):
    raise ConfigError(f'--workdir={workdir}: {file}; expected a folder (made if missing)')
  variants = load_sweep(spec)
  points = [Point(v, seed) for v in variants for seed in range(seeds)]
  args = {p: point_args(p, workdir, overrides) for p in points}
  configs = {}
  for point in points:
    with _of_variant(point.variant):  # a config path is relative to the current folder, not the sweep file's
      configs[point] = load_config(args[point])
    if not configs[point].data.split_file:  # the sweep's, unless a config file, variant or --config names one
      configs[point].data.split_file = str(workdir / 'splits.json')
      args[point].append(f'--config.data.split_file={workdir / "splits.json"}')
  _check_same_data(configs)
  for variant in variants:  # what each point's main.py would refuse at its start, before the slow stores
    config = configs[Point(variant, 0)].copy_and_resolve_references()
    if pathlib.Path(config.data.split_file) == workdir / 'splits.json':
      config.data.split_file = ''  # the sweep's own, written below
    with _of_variant(variant):
      config_check.check_config(config, default.get_config(), 'train')
  evaluations = {p: evaluation(workdir / p.name, configs[p]) for p in points}
  todo = [p for p in points if evaluations[p] is None]
  for point in todo:
    _check_trained_as_asked(point, workdir / point.name, configs[point])
  if dry_run:
    _dry_run(points, args, evaluations)
    return True
  for point in points:
    if evaluations[point]:
      logging.info('sweep: %s finished before (%s), skipped', point.name, evaluations[point])
  logging.info('sweep %s: %d points, %d finished before, %d to run', spec, len(points),
               len(points) - len(todo), len(todo))
  failures = {}
  if todo:
    groups = launch.device_groups(devices_per_run)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_shared_data(todo, configs, workdir)
    failures = launch.Launcher(groups, workdir).run(todo, args)
    evaluations.update({p: evaluation(workdir / p.name, configs[p]) for p in todo})
  failures.update({p: 'no evaluation written' for p in points
                   if evaluations[p] is None and p not in failures})
  table.write_table(table.table_rows(variants, points, evaluations), failures, spec, workdir)
  logging.info('sweep table written to %s', workdir / 'table.md')
  for point, error in failures.items():
    logging.error('sweep point %s failed: %s', point.name, error)
  return not failures
