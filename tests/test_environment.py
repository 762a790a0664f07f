"""Process settings: the XLA:CPU and glibc settings are added once, beside the user's own."""

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
