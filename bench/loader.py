"""Slices per second the Grain training loader delivers at 384 x 384 (read, shuffle, batch: the augmentation
runs on the devices, inside the train step), with 0, 1 and 2 worker processes, on a phantom slice store
built in a temporary folder.

python bench/loader.py [--subjects 3] [--batch 16] [--batches 8] [--repeats 3]: prints one JSON line with the
median over the repeats (and every repeat) per setting. Compare with the slices per second a training step
consumes (batch size x steps/s of configs/eas.py on the same machine).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import flags

from configs import default
from easunet_jax import models
from easunet_jax.data import phantom, pipeline, preprocess
from easunet_jax.errors import positive_int, run_cli


def _rate(store: pathlib.Path, batch: int, batches: int, workers: int) -> float:
  """Slices/s over `batches` batches, after one batch that starts the workers and fills the read-ahead."""
  it = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch, seed=0, workers=workers)
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * batch / (time.perf_counter() - start)
  if hasattr(it, 'close'):  # stops the worker processes
    it.close()
  return rate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--subjects', type=positive_int, default=3, help='phantom subjects at OAI-ZIB geometry')
  parser.add_argument('--batch', type=positive_int, default=16, help='slices per batch (configs/eas.py: 16)')
  parser.add_argument('--batches', type=positive_int, default=8, help='batches timed per repeat')
  parser.add_argument('--repeats', type=positive_int, default=3,
                      help='repeats per setting; the median is reported')
  args = parser.parse_args()
  flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
  with tempfile.TemporaryDirectory(prefix='loader_bench_') as tmp:
    cfg = default.get_config().data
    cfg.root, cfg.split = str(pathlib.Path(tmp) / 'knees'), (1.0, 0.0, 0.0)
    phantom.write_dataset(cfg.root, args.subjects)
    store = preprocess.ensure_slice_store(cfg, pathlib.Path(tmp) / 'slices', seed=0,
                                          multiple=models.stride(default.get_config().model.features))
    source = pipeline.SliceSource(store / 'train')
    runs = {}
    for workers in (0, 1, 2):
      runs[f'workers={workers}'] = [round(_rate(store, args.batch, args.batches, workers), 1)
                                    for _ in range(args.repeats)]
    print(json.dumps({
        'slice_hw': list(source[0]['label'].shape), 'train_slices': len(source), 'batch': args.batch,
        'batches_timed': args.batches, 'cpus': os.cpu_count(),
        'slices_per_s_median': {k: statistics.median(v) for k, v in runs.items()},
        'slices_per_s_runs': runs}))


if __name__ == '__main__':
  run_cli(main)
