"""The sweep command line; see the package docstring.

  python -m easunet_jax.sweep --sweep=configs/sweep_table1.py[:ARG] --workdir=W [--seeds=3]
      [--devices_per_run=1] [--dry_run] [--config.<field>=<value> ...]
"""

import functools
import pathlib
import signal
import sys
from collections.abc import Sequence

import jax
from absl import app, flags

from easunet_jax import environment
from easunet_jax.errors import ConfigError, UserError, exit_with

environment.check_own_configs()

from easunet_jax.sweep import run  # noqa: E402

flags.DEFINE_string('sweep', None, 'Sweep file defining sweep(add), e.g. configs/sweep_table1.py[:demo].')
flags.DEFINE_string('workdir', None, 'Sweep directory: one sub-folder per point, the tables beside them.')
flags.DEFINE_integer('seeds', 3, 'Seeds 0..N-1 of each variant.', lower_bound=1)
flags.DEFINE_integer('devices_per_run', 1, 'GPUs per point; points run at once on separate GPU groups.',
                     lower_bound=1)
flags.DEFINE_bool('dry_run', False, 'List the points, their state and their commands; run nothing.')
flags.mark_flags_as_required(['sweep', 'workdir'])
FLAGS = flags.FLAGS


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad or missing flag in one line with ConfigError's exit code, as main.py's."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    exit_with(ConfigError(str(e)))


def main(argv: Sequence[str], overrides: Sequence[str]) -> None:
  if len(argv) > 1:
    exit_with(ConfigError(f'unexpected arguments {argv[1:]}: every argument is a flag, --<name>=<value> '
                          '(config fields as --config.<field>=<value>)'))
  try:
    finished = run.run_sweep(FLAGS.sweep, pathlib.Path(FLAGS.workdir).absolute(), FLAGS.seeds,
                             FLAGS.devices_per_run, FLAGS.dry_run, overrides)
  except UserError as e:
    exit_with(e)
  except KeyboardInterrupt:  # before the points start (a running point's stop is the launcher's), no bug
    print('stopped (Ctrl-C); the same command resumes', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  if not finished:
    sys.exit(1)


if __name__ == '__main__':
  # This process builds the split and the slice store (and draws a labels-only set's test images) on the
  # CPU: a GPU backend here would take most of every GPU's memory from the points for the whole sweep.
  jax.config.update('jax_platforms', 'cpu')
  # The --config.* flags belong to the points; absl would reject them as this program's flags.
  config_overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  app.run(functools.partial(main, overrides=config_overrides),
          argv=[a for a in sys.argv if not a.startswith('--config.')], flags_parser=_parse_flags)
