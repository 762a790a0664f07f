"""Process settings that XLA:CPU reads only at start-up; `main.py` and the benchmarks call `configure()`
before they import jax, so that all of them run the same program (docs/performance.md says what each
setting is worth); matplotlib's folder where its own cannot be written. And the check, at each command
line's start, that the project's configs are the ones imported."""

import atexit
import importlib
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Mapping

from easunet_jax.errors import ConfigError, exit_with

# XLA:CPU maps a fresh multi-GB scratch buffer every training step; with glibc's transparent huge pages
# its page faults stop eating into the step. glibc reads the setting only when a process starts.
_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
# XLA:CPU's concurrency-optimised scheduler nearly triples a training step's scratch memory where the
# depthwise convolution is XLA's stencil (docs/performance.md).
_XLA_CPU_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def with_settings(env: Mapping[str, str]) -> dict[str, str]:
  """`env` with both settings added where they are missing."""
  env = dict(env)
  tunables, flags = env.get('GLIBC_TUNABLES', ''), env.get('XLA_FLAGS', '')
  if _HUGE_PAGES.partition('=')[0] + '=' not in tunables:  # the user's own setting stays
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, _HUGE_PAGES]))
  if _XLA_CPU_FLAG.partition('=')[0] not in flags:
    env['XLA_FLAGS'] = f'{flags} {_XLA_CPU_FLAG}'.strip()
  return env


def configure() -> None:
  """Adds both settings to this process's environment; on Linux the process then starts again once when
  glibc's huge pages were not on yet. Call it before jax is imported."""
  env = with_settings(os.environ)
  huge_pages_missing = env['GLIBC_TUNABLES'] != os.environ.get('GLIBC_TUNABLES')
  os.environ.update(env)
  if huge_pages_missing and sys.platform.startswith('linux'):
    os.execv(sys.executable, sys.orig_argv)  # the interpreter's own options (-O, -X, -c ...) too
  _matplotlib_folder()


def _matplotlib_folder() -> None:
  """Gives matplotlib a temporary folder (MPLCONFIGDIR, removed at exit) where it is unset and the folders
  matplotlib keeps its settings and font cache in, under XDG_CONFIG_HOME and XDG_CACHE_HOME (or ~/.config
  and ~/.cache), cannot be made or written (a read-only home on a cluster node): matplotlib would make one
  too, with warnings at every start."""
  if 'MPLCONFIGDIR' in os.environ:
    return
  for variable, default in (('XDG_CONFIG_HOME', '.config'), ('XDG_CACHE_HOME', '.cache')):
    folder = pathlib.Path(os.environ.get(variable) or pathlib.Path.home() / default) / 'matplotlib'
    try:
      folder.mkdir(parents=True, exist_ok=True)
      tempfile.TemporaryFile(dir=folder).close()
    except OSError:
      os.environ['MPLCONFIGDIR'] = tempfile.mkdtemp(prefix='easunet_jax_matplotlib_')
      atexit.register(shutil.rmtree, os.environ['MPLCONFIGDIR'], ignore_errors=True)
      return


def benchmark_env(threads: int) -> dict[str, str]:
  """The environment of a benchmark subprocess (ours or the PyTorch reference): both settings, so it needs
  no restart, and `threads` threads for PyTorch."""
  return {**with_settings(os.environ), 'OMP_NUM_THREADS': str(threads)}


def check_own_configs() -> None:
  """Exits with one line where `configs`, the project's package of configs, cannot be imported: `python -m`
  puts the working directory first on the path, where a package of the user's own named configs (a folder
  with an __init__.py) hides the one an installed easunet_jax has beside it."""
  try:
    for name in ('configs.default', 'configs.eas'):
      importlib.import_module(name)
  except ImportError as e:
    found = getattr(sys.modules.get('configs'), '__file__', None) or 'a package named configs'
    exit_with(ConfigError(f"{found}: hides easunet_jax's own configs ({e}); run from another folder, or "
                          'rename that package'))
