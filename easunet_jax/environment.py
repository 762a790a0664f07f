"""Process settings that XLA:CPU reads only at start-up; `main.py` and the benchmarks call `configure()`
before they import jax, so that all of them run the same program (docs/performance.md says what each
setting is worth)."""

import os
import sys

# XLA:CPU maps a fresh multi-GB scratch buffer every training step; with glibc's transparent huge pages
# its page faults stop eating into the step. glibc reads the setting only when a process starts.
_HUGE_PAGES = 'glibc.malloc.hugetlb=1'
# XLA:CPU's concurrency-optimised scheduler more than doubles a training step's scratch memory.
_XLA_CPU_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def configure(restart: bool = True) -> None:
  """Sets the XLA flag; with `restart` (on Linux), first starts this process again once with glibc's huge
  pages when they are not on yet. Call it before jax is imported."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if restart and sys.platform.startswith('linux') and _HUGE_PAGES not in tunables:
    os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, _HUGE_PAGES]))
    os.execv(sys.executable, [sys.executable, *sys.argv])
  flags = os.environ.get('XLA_FLAGS', '')
  if _XLA_CPU_FLAG.partition('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {_XLA_CPU_FLAG}'.strip()


def benchmark_env(threads: int) -> dict[str, str]:
  """The environment of a benchmark subprocess (ours or the PyTorch reference): these settings, no restart
  needed, and `threads` threads for PyTorch."""
  env = dict(os.environ, OMP_NUM_THREADS=str(threads))
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), _HUGE_PAGES]))
  env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} {_XLA_CPU_FLAG}".strip()
  return env
