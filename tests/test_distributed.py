"""Multi-host training on jax.distributed: two processes of two CPU devices each, joined over a loopback
coordinator, train configs/tiny.py through main.py like a one-process run on four devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from easunet_jax import checkpoints, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tiny's training amplifies rounding: at its lr of 0.01 a one-process run on two devices and one on four
# (the same sums in another order) part by 5e-5 in the parameters after 2 steps and 2e-2 after 4, and at
# 0.001 two processes and one part by 8e-4 after 6 steps (momentum raises the step as it builds up). At
# 1e-4 they part by 9e-8 while the parameters move by 1e-3 from step 3 to step 6 (measured on CPU).
LR = 1e-4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two_processes(workdir: pathlib.Path) -> list[str]:
  """Trains tiny in `workdir` with two processes; returns each one's stderr."""
  address = f'127.0.0.1:{_free_port()}'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
         # The coordinator listens on loopback only (JAX's default address, [::], needs IPv6).
         'JAX_COORDINATOR_BIND_ADDRESS': address, 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen(
      [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
       f'--config.optim.lr={LR}', '--config.train.distributed=True', f'--coordinator_address={address}',
       '--num_processes=2',
       f'--process_id={i}'], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outputs]


def _max_abs_difference(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                          a, b)))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(one-process final state, one-process workdir, two-process workdir, the two processes' stderr)."""
  root = tmp_path_factory.mktemp('distributed')  # both runs share the phantom in root/phantom
  config = tiny.get_config()
  config.optim.lr = LR
  one = train.train_and_evaluate(config, root / 'one')
  return one, root / 'one', root / 'two', _run_two_processes(root / 'two')


def test_two_processes_train_like_one(runs):
  one, _, two_dir, _ = runs
  config = tiny.get_config()
  mngr = checkpoints.manager(two_dir, config.checkpoint.keep)
  assert mngr.all_steps() == [3, 6]
  two, _ = checkpoints.restore(mngr, 6, one)
  two_at_3, _ = checkpoints.restore(mngr, 3, one)
  mngr.close()
  assert int(two.step) == 6
  # Same global batches; only the order of the cross-device sums differs (gloo against in-process).
  assert _max_abs_difference(one.params, two.params) < 1e-5
  assert _max_abs_difference(two_at_3.params, two.params) > 1e-4  # so the bound above says something
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
