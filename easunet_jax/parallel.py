"""Devices and hosts: the ('data',) mesh that batches are split over, its two shardings, batch sizes that
fit it, the memory a device has free, and work that one process does while the others wait."""

import contextlib
import hashlib
import os
import pathlib
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from easunet_jax.errors import ConfigError, UserError, one_line

# How long the processes wait for each other to join: JAX's default.
JOIN_TIMEOUT_S = 300
# JAX's own client aborts the process with a C++ stack trace at its deadline: it gets this much longer
# than the watchdog that ends the process in one line before it.
_JAX_GRACE_S = 30
# Where jax.distributed reads what the flags leave out (jax/_src/clusters): the coordinator from its own
# variable, Slurm's or Open MPI's; the process count and this process's id from Slurm's or Open MPI's.
_FROM_ENVIRONMENT = (('JAX_COORDINATOR_ADDRESS', 'SLURM_STEP_NODELIST', 'OMPI_MCA_orte_hnp_uri'),
                     ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'), ('SLURM_PROCID', 'OMPI_COMM_WORLD_RANK'))


def _joining(coordinator_address: str | None, num_processes: int | None, process_id: int | None
             ) -> tuple[str, str]:
  """('process <id> of <count>', '<where>=<coordinator>') from the flags, or where they leave one out, from
  the first variable JAX reads it from, named ('?' where none is set)."""
  values, names = [], []
  for value, variables in zip((coordinator_address, num_processes, process_id), _FROM_ENVIRONMENT):
    name = next((name for name in variables if name in os.environ), None) if value is None else None
    values.append(os.environ[name] if name else '?' if value is None else value)
    names.append(name)
  address, count, index = values
  read = [name for name in (names[2], names[1]) if name]
  return (f'process {index} of {count}' + (f' ({", ".join(read)})' if read else ''),
          f'{names[0] or "--coordinator_address"}={address}')


def join_processes(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                   timeout_s: int = JOIN_TIMEOUT_S, say_after_s: float = 10) -> None:
  """jax.distributed.initialize, with what a user needs to hear: after `say_after_s` of waiting, a line
  saying who waits, for what and for how long, from the flags or the cluster's variables JAX reads instead;
  a process other than 0 given an address where nothing answers stops in one ConfigError line after
  `timeout_s`, and any process whose others did not join by then ends in one line and exit code 1 (JAX's own
  client would abort it with a C++ stack trace). Bad flags are one ConfigError line."""
  who, coordinator = _joining(coordinator_address, num_processes, process_id)

  def waiting():
    logging.warning('%s: waiting for the processes to join at %s (%d s at most)', who, coordinator, timeout_s)

  def not_joined():  # the main thread waits inside JAX's C++ client: only leaving the process ends it
    hint = ('under Slurm start every task with srun' if 'SLURM_JOB_ID' in os.environ else
            'start every process, each with its --process_id')
    print(f'error: {who}: the other processes did not join at {coordinator} in {timeout_s} s; {hint}',
          file=sys.stderr, flush=True)
    os._exit(UserError.exit_code)

  timer = threading.Timer(say_after_s, waiting)
  timer.start()
  watchdog = None
  try:
    if coordinator_address and num_processes and process_id is not None and 0 < process_id < num_processes:
      _wait_for_coordinator(coordinator_address, timeout_s)
    watchdog = threading.Timer(timeout_s, not_joined)  # counted from the coordinator's answer
    watchdog.start()
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + _JAX_GRACE_S)
  except ValueError as e:  # a flag missing (outside a cluster JAX reads them from) or out of range
    raise ConfigError(f'train.distributed: {one_line(e)} (--coordinator_address, --num_processes, '
                      '--process_id)') from None
  finally:
    timer.cancel()
    if watchdog:
      watchdog.cancel()


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  host, _, port = address.rpartition(':')
  if not port.isdigit():
    raise ConfigError(f'--coordinator_address={address}: expected host:port')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host.strip('[]'), int(port)), timeout=5).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConfigError(f'--coordinator_address={address}: nothing answered there in {timeout_s:g} s '
                          f'({one_line(e)}); start process 0 on that host, or give its address') from None
      time.sleep(1)


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all): batches split along it, state replicated."""
  devices = devices or jax.devices()
  return jax.make_mesh((len(devices),), ('data',), axis_types=(AxisType.Auto,), devices=devices)


def shardings(mesh: jax.sharding.Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(data, replicated): a batch split along its first axis over `mesh`, and one copy on every device."""
  return NamedSharding(mesh, P('data')), NamedSharding(mesh, P())


def round_to_devices(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh's device count that holds `batch_size` (every device gets as many
  rows; evaluation pads the last batch)."""
  return -(-batch_size // mesh.size) * mesh.size


# A cgroup v1 memory limit at or above this is none (the kernel writes 2^63 rounded down to a page).
_NO_CGROUP_LIMIT = 2**60


def _read_int(path: pathlib.Path) -> int | None:
  try:
    value = path.read_text().strip()
  except OSError:
    return None
  return int(value) if value.isdigit() else None


def _cgroup_room(root: pathlib.Path, resident: int) -> list[int]:
  """What this process's memory cgroups, and every cgroup above them, leave of their limits: cgroup v2's
  memory.max (v1's memory.limit_in_bytes) less the group's working set, its usage less the file cache the
  kernel can drop (as the kubelet counts it), or, where the group's usage cannot be read, less this
  process's `resident` bytes. Inside a container the path /proc/self/cgroup names may not be mounted: the
  walk up then reaches the container's own limit at the mount's top."""
  try:
    lines = (root / 'proc/self/cgroup').read_text().splitlines()
  except OSError:
    return []
  room = []
  for line in lines:
    _, controllers, path = line.split(':', 2)
    if controllers == '':
      top, names = root / 'sys/fs/cgroup', ('memory.max', 'memory.current', 'inactive_file')
    elif 'memory' in controllers.split(','):
      top, names = (root / 'sys/fs/cgroup/memory',
                    ('memory.limit_in_bytes', 'memory.usage_in_bytes', 'total_inactive_file'))
    else:
      continue
    folder = top / path.lstrip('/')
    for level in [folder, *folder.parents]:
      limit = _read_int(level / names[0])
      if limit is not None and limit < _NO_CGROUP_LIMIT:
        used = _read_int(level / names[1])
        try:
          stat = (level / 'memory.stat').read_text()
        except OSError:
          stat = ''
        if used is None:
          used = resident
        elif droppable := re.search(rf'^{names[2]} (\d+)$', stat, re.M):
          used -= int(droppable[1])
        room.append(limit - used)
      if level == top:
        break
  return room


def host_memory_free(root: pathlib.Path = pathlib.Path('/')) -> int | None:
  """Bytes this process may still allocate before Linux's out-of-memory killer ends it: the kernel's
  MemAvailable, or less where a memory cgroup (a container's, a cluster job's) holds the process and its
  neighbours (data workers, a sweep's other points) to a limit; None where the system does not say (not
  Linux)."""
  try:
    meminfo = (root / 'proc/meminfo').read_text()
    resident = int((root / 'proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return None
  if not (available := re.search(r'^MemAvailable:\s+(\d+) kB', meminfo, re.M)):
    return None
  return max(min([int(available[1]) * 1024, *_cgroup_room(root, resident)]), 0)


def memory_free(device: jax.Device) -> int | None:
  """Bytes a program may still allocate on `device`: a GPU's free memory; on a CPU the host's
  (`host_memory_free`), which the host's CPU devices share; None where unknown."""
  if device.platform == 'cpu':
    return host_memory_free()
  stats = device.memory_stats() or {}
  return stats['bytes_limit'] - stats['bytes_in_use'] if 'bytes_limit' in stats else None


def check_same_step(workdir: pathlib.Path, step: int, what: str) -> None:
  """Refuses, on every process, a multi-process run whose processes find different checkpoints (`step`:
  the one each `what`, 0 for none) or name different workdirs: restoring and initialising, or restoring
  different steps, they would wait for each other in different collectives, for ever. The workdir must be
  one folder on a disk all processes see."""
  if jax.process_count() == 1:
    return
  # The path as a number a collective can carry: 3 bytes of its hash.
  path = int.from_bytes(hashlib.sha256(str(workdir.resolve()).encode()).digest()[:3], 'little')
  seen = multihost_utils.process_allgather(np.array([step, path], np.int32))
  if (seen != seen[0]).any():
    raise UserError(f'the processes would start from different checkpoints: {what} step '
                    f'{", ".join(f"{s} (process {i})" for i, s in enumerate(seen[:, 0]))}'
                    f'{", in different workdirs" if (seen[:, 1] != seen[0, 1]).any() else ""}; give every '
                    'process the same --workdir, on a disk all of them see')


@contextlib.contextmanager
def process_0_first(what: str) -> Iterator[None]:
  """Process 0 runs the block first while the others wait, then the others run it: e.g. the slice store,
  which builders running at once would delete under each other. On a shared disk the others then find the
  work done. Where the block fails on process 0, the others stop with a one-line `UserError` that points
  to its error, rather than time out at a barrier it never reaches."""
  if jax.process_count() == 1:
    yield
    return
  if jax.process_index() > 0:
    if not multihost_utils.broadcast_one_to_all(np.bool_(True)):  # process 0's outcome
      raise UserError(f'process 0 failed before "{what}" (its error is in its log)')
    yield
    return
  try:
    yield
  except BaseException:
    multihost_utils.broadcast_one_to_all(np.bool_(False))
    raise
  multihost_utils.broadcast_one_to_all(np.bool_(True))
