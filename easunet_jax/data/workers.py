"""Work done case by case (phantom subjects, the slice store's cases) spread over worker processes: numpy
and scipy.ndimage run single-threaded here, so each worker uses one core. And the cap of the training
loader's workers at the CPUs."""

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

from absl import logging


def cpus() -> int:
  """CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def at_most_cpus(workers: int, name: str) -> int:
  """`workers` worker processes, at most one per CPU this process may run on (more only take turns on them,
  each holding its memory); a line says so where the setting `name` asked for more."""
  usable = cpus()
  if workers > usable:
    logging.warning('%s=%d lowered to %d: this process may run on %d CPU(s)', name, workers, usable, usable)
  return min(workers, usable)


def map_in_order(fn: Callable, jobs: Sequence[tuple], workers: int,
                 initializer: Callable[[], None] | None = None) -> Iterator:
  """fn(*job) of each job, yielded in the jobs' order as each is done: in this process when `workers` <= 1,
  else in up to `workers` processes, each first running `initializer`. An exception of a job, or Ctrl-C,
  cancels the jobs not yet started (those running finish) and is raised here."""
  workers = min(workers, len(jobs))
  if workers <= 1:
    for job in jobs:
      yield fn(*job)
    return
  # 'spawn': the parent may have jax imported and its threads running, which fork does not survive.
  with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                  initializer=initializer) as pool:
    pending = [pool.submit(fn, *job) for job in jobs]
    try:
      for done in pending:
        yield done.result()  # re-raises a worker's exception
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise
