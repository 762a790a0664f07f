"""Runs sweep points as `main.py` processes (train, then evaluate), one per group of GPUs at a time, and
passes SIGTERM, SIGINT and SIGHUP on to them."""

import concurrent.futures
import ctypes
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Sequence

from absl import logging

from easunet_jax.errors import ConfigError
from easunet_jax.sweep.points import Point

MODES = ('train', 'evaluate')


def main_command(args: Sequence[str], mode: str) -> list[str]:
  """The command line of one point's `mode`: `python -m easunet_jax`, as main.py runs it."""
  return [sys.executable, '-m', 'easunet_jax', *args, f'--mode={mode}']


def device_groups(devices_per_run: int) -> list[str | None]:
  """CUDA_VISIBLE_DEVICES values of the points that may run at once: the GPUs visible to this process
  (nvidia-smi, so that this process claims none) in groups of `devices_per_run`; [None] without GPUs."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    gpus = [g.strip() for g in visible.split(',') if g.strip()]
  else:
    try:
      listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
      listing = ''
    gpus = [str(i) for i in range(sum(row.startswith('GPU ') for row in listing.splitlines()))]
  if not gpus:
    return [None]
  if devices_per_run > len(gpus):
    raise ConfigError(f'--devices_per_run={devices_per_run}, but only {len(gpus)} GPUs are visible')
  if len(gpus) % devices_per_run:
    logging.warning('%d GPUs in groups of %d: GPUs %s stay idle', len(gpus), devices_per_run,
                    ','.join(gpus[len(gpus) // devices_per_run * devices_per_run:]))
  return [','.join(gpus[i:i + devices_per_run])
          for i in range(0, len(gpus) - devices_per_run + 1, devices_per_run)]


# Linux: a point's process is sent SIGTERM (it saves and stops) when the sweep's thread that started it
# dies, even by SIGKILL, which the point's own session would otherwise outlive, training on unwatched.
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == 'linux' else None


def _stop_with_the_sweep() -> None:
  _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _why(log_path: pathlib.Path, offset: int) -> str:
  """Why a point's process failed: main.py's one-line `error: ...` in what the log holds from `offset` on
  (where the process began to append), else the last line there (a traceback's)."""
  with log_path.open('rb') as f:
    f.seek(offset)
    lines = [line for line in f.read().decode(errors='replace').splitlines() if line.strip()]
  return ([line for line in lines if line.startswith('error: ')] or lines or [''])[-1]


class Launcher:
  """Runs points, one per device group at a time, each in its own session so that a terminal's Ctrl-C
  reaches the sweep only. SIGTERM or SIGINT to the sweep is passed on once to the running points (main.py
  then saves a checkpoint after the step in flight and exits) and stops the sweep: no point is evaluated
  or started after it, and the same command resumes. SIGHUP (a closed terminal; unless the sweep runs
  under nohup) is passed on as SIGTERM, so that no point trains on unwatched; so is the sweep's own death
  by SIGKILL, on Linux. A second Ctrl-C passed on kills the points; a second SIGTERM lets their saves finish
  (a point hung past it ends by kill -9)."""

  def __init__(self, groups: Sequence[str | None], workdir: pathlib.Path):
    self.groups, self.workdir = groups, workdir
    self.free = queue.SimpleQueue()
    for group in groups:
      self.free.put(group)
    self.stopped_by = ''  # the signal's name once one came
    self.running: set[subprocess.Popen] = set()
    self.lock = threading.Lock()

  def _pass_on(self, signum: int, frame) -> None:
    del frame
    self.stopped_by = signal.Signals(signum).name
    with self.lock:
      for process in self.running:
        process.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

  def run(self, points: Sequence[Point], args: dict[Point, list[str]]) -> dict[Point, str]:
    """Runs `points`; returns why each one that did not finish failed."""
    start = time.monotonic()

    def run_numbered(numbered: tuple[int, Point]) -> str | None:
      i, point = numbered
      group = self.free.get()
      try:
        if self.stopped_by:
          return f'not started, the sweep was stopped by {self.stopped_by}'
        where = f' on GPUs {group}' if group is not None else ''
        logging.info('sweep [%d/%d] %s started%s', i, len(points), point.name, where)
        began = time.monotonic()
        error = self._run_point(point, args[point], group)
        logging.info('sweep [%d/%d] %s %s in %.0f s (sweep %.0f s)', i, len(points), point.name,
                     f'FAILED: {error}' if error else 'finished', time.monotonic() - began,
                     time.monotonic() - start)
        return error
      finally:
        self.free.put(group)

    passed_on = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup's choice stands
      passed_on.append(signal.SIGHUP)
    previous = {s: signal.signal(s, self._pass_on) for s in passed_on}
    try:
      with concurrent.futures.ThreadPoolExecutor(len(self.groups)) as pool:
        errors = list(pool.map(run_numbered, enumerate(points, 1)))
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    return {point: error for point, error in zip(points, errors) if error}

  def _run_point(self, point: Point, args: Sequence[str], group: str | None) -> str | None:
    """Trains (or resumes) and evaluates `point` on the GPUs of `group` (None: the default devices), its
    output appended to <point>/sweep.log; None on success, else why it failed."""
    env = dict(os.environ)
    if group is not None:
      env['CUDA_VISIBLE_DEVICES'] = group
    log_path = self.workdir / point.name / 'sweep.log'
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
      with log_path.open('a') as log, self.lock, warnings.catch_warnings():
        # JAX warns of any fork in a process that initialised it; the child calls prctl only, then execs.
        warnings.filterwarnings('ignore', r'os\.fork\(\) was called', RuntimeWarning)
        offset = log.tell()
        process = subprocess.Popen(main_command(args, mode), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_PRCTL and _stop_with_the_sweep)
        self.running.add(process)
        if self.stopped_by:  # the signal came while it started
          process.send_signal(signal.SIGTERM)
      status = process.wait()
      with self.lock:
        self.running.discard(process)
      if self.stopped_by:  # stopped by the sweep's signal: resumable, and not to be evaluated
        return f'stopped by {self.stopped_by} in {mode}; run the same command to resume'
      if status:
        return f'{mode} exited with status {status}: {_why(log_path, offset)} (log: {log_path})'
    return None
