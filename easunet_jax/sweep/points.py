"""A sweep file and its points: the variants that its `sweep(add)` adds, each run with seeds 0..N-1, and
the `main.py` arguments and config of each point."""

import dataclasses
import importlib.util
import inspect
import pathlib
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs import default
from easunet_jax import config_check
from easunet_jax.errors import ConfigError

# Fields the sweep sets for every point: a variant's or user's value would break the seeds or the shared
# slice store.
SWEEP_FIELDS = ('seed', 'data.cache_dir')


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
  path, _, arg = config_check.project_file(spec).partition(':')
  if not pathlib.Path(path).is_file():
    raise ConfigError(f'--sweep: no file {path}')
  module_spec = importlib.util.spec_from_file_location('sweep_file', path)
  if module_spec is None:  # what Python does not import: a name without .py
    raise ConfigError(f'--sweep: {path} is not a Python file; a sweep is a .py file defining sweep(add)')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)  # an error of the file's own code keeps its traceback, as a config's
  sweep = getattr(module, 'sweep', None)
  variants = []

  def add(name: str, config: str, title: str = '', **fields) -> None:
    if not isinstance(name, str) or not re.fullmatch(r'[\w.-]+', name):
      raise ConfigError(f'{path}: variant name {name!r} is not a folder name (letters, digits, _ . -)')
    if arg and ':' in config:
      raise ConfigError(f'{path}: variant {name} names config {config} with an argument, and the sweep '
                        f'has :{arg}')
    if taken := [field for field in SWEEP_FIELDS if field in fields]:
      raise ConfigError(f'{path}: variant {name} sets {taken[0]}, which the sweep sets for each point (seeds '
                        '0 .. --seeds - 1, one slice store for all)')
    variants.append(Variant(name, title or name, f'{config}:{arg}' if arg else config,
                            tuple(_flag(k, v) for k, v in fields.items())))

  try:
    inspect.signature(sweep).bind(add)
  except (TypeError, ValueError):  # none, not a function, or one that does not take `add`
    raise ConfigError(f'{path}: defines no function sweep(add) of one argument, add, that adds the '
                      'variants') from None
  sweep(add)
  names = [v.name for v in variants]
  if not names or len(set(names)) != len(names):
    raise ConfigError(f'{path}: sweep(add) must add at least one variant and no name twice, got {names}')
  return variants


def point_args(point: Point, workdir: pathlib.Path, overrides: Sequence[str]) -> list[str]:
  """main.py's arguments for `point` (without --mode): the user's overrides of fields the variant leaves, the
  variant's, then the sweep's own (seed, the shared slice store). (Both given, absl would join a tuple
  field's two values into one.)"""
  variant_fields = {o.partition('=')[0] for o in point.variant.overrides}
  return [f'--config={point.variant.config}', f'--workdir={workdir / point.name}',
          *(o for o in overrides if o.partition('=')[0] not in variant_fields),
          *point.variant.overrides, f'--config.seed={point.seed}',
          f'--config.data.cache_dir={workdir / "slices"}']


def load_config(args: Sequence[str]) -> ml_collections.ConfigDict:
  """The config main.py builds from `args`, parsed the same way (config_flags, locked)."""
  argv = config_check.project_config(['easunet_jax', *(a for a in args if a.startswith('--config'))])
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
    flag_values.config.keys()  # a config file that failed to load raises only when it is read
  except config_check.OVERRIDE_ERRORS as e:  # as main.py reports them
    if (line := config_check.override_error(e, argv, default.get_config())) is None:
      raise
    raise ConfigError(f'{args[0]}: {line}') from None
  except OSError as e:  # the config file: the last line of the chained report says why
    raise ConfigError(f'{args[0]}: {str(e).strip().splitlines()[-1].strip()}') from None
  config_check.check_complete(flag_values.config, default.get_config(), args[0])
  return flag_values.config
