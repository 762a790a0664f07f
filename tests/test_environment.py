"""Process settings: the XLA:CPU and glibc settings are added once, beside the user's own; a process
without glibc's setting starts again once, one with it does not."""

import os
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
