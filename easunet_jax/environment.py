"""Process settings that XLA:CPU reads only at start-up; `main.py` and the benchmarks call `configure()`
before they import jax, so that all of them run the same program (docs/performance.md says what each
setting is worth)."""

import os
import sys
from collections.abc import Mapping

# XLA:CPU maps a fresh multi-GB scratch buffer every training step; with glibc's transparent huge pages
# its page faults stop eating into the step. glibc reads the setting only when a process starts.
_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
# XLA:CPU's concurrency-optimised scheduler more than doubles a training step's scratch memory.
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


def benchmark_env(threads: int) -> dict[str, str]:
  """The environment of a benchmark subprocess (ours or the PyTorch reference): both settings, so it needs
  no restart, and `threads` threads for PyTorch."""
  return {**with_settings(os.environ), 'OMP_NUM_THREADS': str(threads)}
