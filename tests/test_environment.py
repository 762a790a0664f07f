"""Process settings: the XLA:CPU and glibc settings are added once, beside the user's own; a process
without glibc's setting starts again once, one with it does not; a package of the user's named configs
that hides the project's is one line."""

import os
import pathlib
import site
import subprocess
import sys

from easunet_jax import environment


def test_settings_are_added_once_beside_the_users():
  env = environment.with_settings({})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert env['XLA_FLAGS'] == '--xla_cpu_enable_concurrency_optimized_scheduler=false'
  assert environment.with_settings(env) == env
  mine = environment.with_settings({'XLA_FLAGS': '--xla_foo', 'GLIBC_TUNABLES': 'glibc.x=1'})
  assert mine['XLA_FLAGS'].startswith('--xla_foo ') and mine['GLIBC_TUNABLES'].startswith('glibc.x=1:')
  off = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert environment.with_settings(off)['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=0'
  scheduler_on = {'XLA_FLAGS': '--xla_cpu_enable_concurrency_optimized_scheduler=true'}
  assert environment.with_settings(scheduler_on)['XLA_FLAGS'] == scheduler_on['XLA_FLAGS']
  assert environment.benchmark_env(3) == {**environment.with_settings(os.environ), 'OMP_NUM_THREADS': '3'}


def test_configure_starts_the_process_again_only_on_linux_without_the_glibc_setting(monkeypatch):
  starts = []
  monkeypatch.setattr(os, 'execv', lambda *args: starts.append(args))
  monkeypatch.setattr(sys, 'platform', 'linux')
  for key, value in environment.with_settings(os.environ).items():
    monkeypatch.setenv(key, value)
  environment.configure()
  assert starts == []  # a start again would find the same environment: it would start again for ever
  monkeypatch.delenv('GLIBC_TUNABLES')
  environment.configure()
  assert starts == [(sys.executable, sys.orig_argv)]
  assert os.environ['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  monkeypatch.setattr(sys, 'platform', 'darwin')  # no glibc: starting again would change nothing
  monkeypatch.delenv('GLIBC_TUNABLES')
  environment.configure()
  assert len(starts) == 1


def test_a_package_of_the_users_named_configs_is_one_line(tmp_path):
  """`python -m easunet_jax` puts the working directory first on the path: a package of the user's named
  configs there hides the project's, as a non-editable install has it (no editable finder: python -S, the
  site-packages added as plain folders)."""
  repo = pathlib.Path(__file__).resolve().parents[1]

  def check(*folders: pathlib.Path) -> subprocess.CompletedProcess:
    path = [*map(str, folders), str(repo), *site.getsitepackages()]
    code = (f'import sys; sys.path[:0] = {path!r}; from easunet_jax import environment; '
            'environment.check_own_configs()')
    return subprocess.run([sys.executable, '-S', '-c', code], capture_output=True, text=True, timeout=60)

  assert check().returncode == 0
  (tmp_path / 'configs').mkdir()
  assert check(tmp_path).returncode == 0  # a folder of configs, no package: the project's still found
  (tmp_path / 'configs' / '__init__.py').write_text('')
  result = check(tmp_path)
  assert (result.returncode, result.stderr) == (
      2, f"error: {tmp_path}/configs/__init__.py: hides easunet_jax's own configs (No module named "
         "'configs.default'); run from another folder, or rename that package\n")
