"""Multi-host training on jax.distributed: two processes of two CPU devices each, joined over a loopback
coordinator, train configs/tiny.py (augmented) through main.py like a one-process run on four devices
(conftest's `augmented_tiny`)."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from easunet_jax import checkpoints, parallel
from easunet_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(args: list[str], own_args: tuple[list[str], list[str]] = ([], [])
                   ) -> list[tuple[int, str]]:
  """(exit code, stderr) of each of two main.py processes of `args` (and each its `own_args`), joined as
  train.distributed."""
  address = f'127.0.0.1:{_free_port()}'
  env = {**os.environ,
         'XLA_FLAGS': os.environ['XLA_FLAGS'].replace('device_count=4', 'device_count=2'),
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
         # The coordinator listens on loopback only (JAX's default address, [::], needs IPv6).
         'JAX_COORDINATOR_BIND_ADDRESS': address, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen(
      [sys.executable, 'main.py', *args, *own_args[i], '--config.train.distributed=True',
       f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outputs)]


def _run_two_processes(config, workdir: pathlib.Path) -> list[str]:
  """Trains `augmented_tiny`'s `config` in `workdir` with two processes; returns each one's stderr."""
  results = _two_processes([
      '--config=configs/tiny.py', f'--workdir={workdir}',
      f'--config.data.phantom_dir={config.data.phantom_dir}', '--config.data.augment=true',
      '--config.checkpoint.every_steps=2', f'--config.optim.lr={config.optim.lr}',
      f'--config.optim.schedule={config.optim.schedule}'])
  for code, err in results:
    assert code == 0, err[-3000:]
  return [err for _, err in results]


def test_a_failure_of_process_0_stops_the_others_in_one_line(tmp_path):
  """Process 0 builds the slice store while the others wait: its error (here, no data) stops them at once
  with a line pointing to it, not with a barrier's time-out."""
  for folder in ('images', 'labels'):
    (tmp_path / 'data' / folder).mkdir(parents=True)
  (code0, err0), (code1, err1) = _two_processes(
      ['--config=configs/tiny.py', '--mode=preprocess', f'--workdir={tmp_path / "run"}',
       f'--config.data.root={tmp_path / "data"}'])
  assert code0 == code1 == 1
  last = err0.splitlines()[-1]
  assert last.startswith('error: ') and last.endswith('images/ holds no volume file')
  assert err1.splitlines()[-1] == ('error: process 0 failed before "slice store built" (its error is in its '
                                   'log)')


def test_processes_given_different_workdirs_stop_in_one_line(tmp_path):
  """Each would find its own checkpoints (here: one a step, the other none) and wait for the other in
  another collective, for ever."""
  (tmp_path / 'a' / 'checkpoints' / '4').mkdir(parents=True)  # a step as orbax names it
  results = _two_processes(['--config=configs/tiny.py'],
                           ([f'--workdir={tmp_path / "a"}'], [f'--workdir={tmp_path / "b"}']))
  for code, err in results:
    assert code == 1 and err.splitlines()[-1] == (
        'error: the processes would start from different checkpoints: resuming from step 4 (process 0), '
        '0 (process 1), in different workdirs; give every process the same --workdir, on a disk all of them '
        'see'), err[-2000:]


def test_a_distributed_flag_out_of_range_is_one_line():
  result = subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py',
                           '--config.train.distributed=True', '--coordinator_address=127.0.0.1:1',
                           '--num_processes=2', '--process_id=5'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2 and result.stderr.startswith('error: train.distributed: process_id and '
                                                             'num_processes must be nonnegative')
  assert len(result.stderr.splitlines()) == 1


def test_a_process_that_finds_no_coordinator_says_it_waits_then_stops_in_one_line(caplog):
  """JAX's own client waits its time-out in silence, then aborts the process with a C++ stack trace."""
  address = f'127.0.0.1:{_free_port()}'
  with pytest.raises(ConfigError, match=rf'^--coordinator_address={re.escape(address)}: nothing answered '
                     r'there in 2 s \(.*\); start process 0 on that host, or give its address$'):
    parallel.join_processes(address, 2, 1, timeout_s=2, say_after_s=0.5)
  assert (f'process 1 of 2: waiting for the processes to join at --coordinator_address={address} (2 s at '
          'most)') in caplog.text


def test_a_slurm_task_whose_others_never_start_stops_in_one_line():
  """An sbatch --ntasks=2 script without srun: one task, its place read from Slurm's variables, waits for a
  process that never comes; JAX's own client would abort it at its deadline with a C++ stack trace."""
  address = f'127.0.0.1:{_free_port()}'
  env = {**os.environ, 'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
         'SLURM_STEP_NODELIST': 'localhost', 'JAX_COORDINATOR_ADDRESS': address,
         'JAX_COORDINATOR_BIND_ADDRESS': address, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
      [sys.executable, '-c', 'from easunet_jax import parallel\n'
       'parallel.join_processes(None, None, None, timeout_s=2, say_after_s=0.5)'],
      cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=60)
  who = 'process 0 of 2 (SLURM_PROCID, SLURM_NTASKS)'
  assert (f'{who}: waiting for the processes to join at JAX_COORDINATOR_ADDRESS={address} (2 s at most)'
          in result.stderr)
  assert (result.returncode, result.stderr.splitlines()[-1]) == (1, (
      f'error: {who}: the other processes did not join at JAX_COORDINATOR_ADDRESS={address} in 2 s; under '
      'Slurm start every task with srun')), result.stderr[-2000:]


def test_a_process_given_the_join_time_after_the_coordinator_answered(monkeypatch):
  """A process other than 0 that found process 0 late still has the whole time-out for the join."""
  exits = []
  monkeypatch.setattr(parallel, '_wait_for_coordinator', lambda address, timeout_s: time.sleep(0.6))
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: time.sleep(0.6))
  monkeypatch.setattr(os, '_exit', exits.append)
  parallel.join_processes('127.0.0.1:1', 2, 1, timeout_s=1, say_after_s=5)
  time.sleep(0.5)  # past where a time-out counted from the start would have fired
  assert exits == []


def _max_abs_difference(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                          a, b)))


@pytest.fixture(scope='module')
def runs(augmented_tiny, tmp_path_factory):
  """(one-process final state, one-process workdir, two-process workdir, the two processes' stderr)."""
  config, one_dir, one = augmented_tiny
  two_dir = tmp_path_factory.mktemp('distributed') / 'two'
  return one, one_dir, two_dir, _run_two_processes(config, two_dir)


def test_two_processes_train_like_one(runs):
  one, _, two_dir, _ = runs
  mngr = checkpoints.manager(two_dir, 2)
  assert mngr.latest_step() == 6 and 4 in mngr.all_steps()
  two = checkpoints.restore(mngr, 6, one)
  two_at_4 = checkpoints.restore(mngr, 4, one)
  mngr.close()
  assert int(two.step) == 6
  # Same global batches and augmentation; only the order of the cross-device sums differs (gloo against
  # in-process).
  assert _max_abs_difference(one.params, two.params) < 1e-5
  assert _max_abs_difference(two_at_4.params, two.params) > 1e-4  # so the bound above says something
  stats = jax.tree.leaves(jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-6),
                                       one.batch_stats, two.batch_stats))
  assert all(stats)


def test_only_process_0_logs(runs):
  _, one_dir, two_dir, (err0, err1) = runs
  rows = [json.loads(line) for line in (two_dir / 'metrics.jsonl').read_text().splitlines()]
  reference = [json.loads(line) for line in (one_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [sorted(row) for row in rows] == [sorted(row) for row in reference]  # no row twice
  assert [row['step'] for row in rows] == [row['step'] for row in reference]
  for row, want in zip(rows, reference):
    for name in ('train/loss', 'val/loss'):
      if name in want:
        assert row[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5)
  assert 'step 6/6' in err0 and 'val loss' in err0
  assert 'step 6/6' not in err1 and 'val loss' not in err1
