"""Seconds `phantom.write_dataset` takes to generate and write the built-in phantom in one process, and in
worker processes; prints a Markdown table (median seconds of each, and the speed-up), then one JSON line.

  python bench/phantom_speed.py [--num=4] [--shape=160,384,384] [--workers=N] [--repeats=3]

Each repeat writes the subjects into a fresh temporary folder, first with workers=1 (in this process),
then with --workers (default: one per CPU this process may use; the worker processes' start is timed
too). The files are the same either way (tests/test_phantom.py).
"""

import json
import statistics
import tempfile
import time

from absl import app, flags

from easunet_jax.data import phantom
from easunet_jax.data import workers as data_workers

_NUM = flags.DEFINE_integer('num', 4, 'Phantom subjects per run.', lower_bound=1)
_SHAPE = flags.DEFINE_list('shape', [str(n) for n in phantom.DEFAULT_SHAPE], 'Voxels of a subject.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Worker processes of the parallel run; default one per CPU.',
                                lower_bound=2)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs of each setting; the median is reported.', lower_bound=1)


def _seconds(shape: tuple[int, ...], workers: int) -> float:
  with tempfile.TemporaryDirectory(prefix='phantom_bench_') as tmp:
    start = time.perf_counter()
    phantom.write_dataset(tmp, _NUM.value, shape, seed=0, workers=workers)
    return time.perf_counter() - start


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  shape = tuple(map(int, _SHAPE.value))
  cpus = data_workers.cpus()
  workers = _WORKERS.value or max(cpus, 2)
  if workers > _NUM.value:  # write_dataset starts no more workers than there are subjects
    raise app.UsageError(f'--num={_NUM.value}: fewer subjects than the {workers} workers to time')
  runs = {1: [], workers: []}
  for _ in range(_REPEATS.value):  # alternating, so that a change of the machine's load hits both
    for w in runs:
      runs[w].append(round(_seconds(shape, w), 2))
  one, many = (statistics.median(runs[w]) for w in runs)
  size = ' x '.join(map(str, shape))
  print(f'| {_NUM.value} subjects of {size}, median s of {_REPEATS.value} | workers=1 | workers={workers} '
        '| speed-up |')
  print('|---|---|---|---|')
  print(f'| {cpus} CPUs | {one:.2f} | {many:.2f} | {one / many:.2f}x |')
  print(json.dumps({'num': _NUM.value, 'shape': list(shape), 'cpus': cpus, 'workers': workers,
                    'median_s': {str(w): statistics.median(v) for w, v in runs.items()},
                    'runs_s': {str(w): v for w, v in runs.items()}, 'speedup': one / many}))


if __name__ == '__main__':
  app.run(main)
