"""The ('data',) mesh: its shardings, batch sizes rounded to the device count, the memory a host has free,
process-0-first."""

import os
import pathlib

import jax
import numpy as np
import pytest

from easunet_jax import parallel


def test_shardings_split_the_batch_and_replicate_the_state():
  mesh = parallel.make_mesh()
  assert mesh.size == jax.device_count() == 4
  data, replicated = parallel.shardings(mesh)
  batch = jax.device_put(np.zeros((8, 3), np.float32), data)
  assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 3)}
  state = jax.device_put(np.zeros((8, 3), np.float32), replicated)
  assert {shard.data.shape for shard in state.addressable_shards} == {(8, 3)}


def test_batch_sizes_round_up_to_the_device_count():
  mesh = parallel.make_mesh()
  assert [parallel.round_to_devices(n, mesh) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
  assert parallel.round_to_devices(5, parallel.make_mesh(jax.devices()[:1])) == 5


def test_process_0_first_runs_the_block_once_in_one_process():
  ran = []
  with parallel.process_0_first('test'):
    ran.append(jax.process_index())
  assert ran == [0]


def _system(root: pathlib.Path, cgroup: str, limits: dict[str, str], available_kb: int = 8_000_000,
            resident_pages: int = 1000) -> pathlib.Path:
  """A /proc and /sys/fs/cgroup under `root`: MemAvailable, this process's resident pages, its cgroup
  lines and the limit files {path under sys/fs/cgroup: content}."""
  (root / 'proc/self').mkdir(parents=True)
  (root / 'proc/meminfo').write_text(f'MemTotal: 16000000 kB\nMemAvailable: {available_kb} kB\n')
  (root / 'proc/self/statm').write_text(f'5000 {resident_pages} 300 1 0 2000 0\n')
  (root / 'proc/self/cgroup').write_text(cgroup)
  for path, content in limits.items():
    (root / 'sys/fs/cgroup' / path).parent.mkdir(parents=True, exist_ok=True)
    (root / 'sys/fs/cgroup' / path).write_text(content)
  return root


@pytest.mark.parametrize('cgroup, limits, free', [
    # No memory limit anywhere: the kernel's MemAvailable.
    ('0::/user.slice\n', {'user.slice/memory.max': 'max\n', 'memory.max': 'max\n'}, 8_000_000 * 1024),
    # A cluster job's cgroup v2 limit two levels above the process's cgroup, less the job's working set
    # (its usage less the file cache the kernel can drop: a slice store's pages).
    ('0::/job_1/step_0/task_0\n', {'job_1/memory.max': '2000000000\n', 'job_1/step_0/memory.max': 'max\n',
                                    'job_1/memory.current': '500000000\n',
                                    'job_1/memory.stat': 'anon 400000000\ninactive_file 100000000\n'},
     1_600_000_000),
    # A container's cgroup v1 limit: the path the process's cgroup names is not mounted in it; its usage
    # unreadable, less what this process holds.
    ('4:memory:/process_api/abc\n3:cpuset:/\n', {'memory/memory.limit_in_bytes': '3000000000\n'},
     3_000_000_000 - 1000 * os.sysconf('SC_PAGE_SIZE')),
    ('4:memory:/\n', {'memory/memory.limit_in_bytes': '3000000000\n', 'memory/memory.usage_in_bytes': '10\n',
                      'memory/memory.stat': 'cache 7\ntotal_inactive_file 4\n'}, 3_000_000_000 - 6),
    # cgroup v1 without a limit (2^63 rounded down to a page), and the process over its limit.
    ('4:memory:/\n', {'memory/memory.limit_in_bytes': '9223372036854771712\n'}, 8_000_000 * 1024),
    ('0::/\n', {'memory.max': '1000\n'}, 0),
])
def test_the_memory_a_host_has_free_is_its_tightest_limit(tmp_path, cgroup, limits, free):
  assert parallel.host_memory_free(_system(tmp_path, cgroup, limits)) == free


def test_a_system_that_does_not_say_its_free_memory_gives_none(tmp_path):
  assert parallel.host_memory_free(tmp_path) is None
  assert parallel.host_memory_free(pathlib.Path('/')) > 0  # Linux: the suite's machine
