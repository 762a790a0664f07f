"""Seconds `predict`'s slice resampling takes (`inference._resize`: gathers and interpolation fused by XLA)
against the same linear interpolation written in numpy (two gathers and three passes over the output per
axis, what predict ran before), on a volume's class probabilities resampled from the network's pixels back
to the scan's (the four sub-pixel grids of a prediction each do this once) and on the scan resampled to the
network's pixels.

python bench/resize.py [--slices 80] [--scan 512] [--network 256] [--repeats 5]: prints one JSON line with
the median seconds over the repeats (after one untimed call, which compiles) per direction and
implementation, their ratio, and the largest difference between the two implementations' outputs.
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from easunet_jax import inference
from easunet_jax.errors import positive_int, run_cli


def _numpy_resize(array: np.ndarray, size: Sequence[int], offset: Sequence[float]) -> np.ndarray:
  """The baseline: the same grid and edge rule as `inference._resize`, in numpy."""
  for axis, n_out, shift in zip((1, 2), size, offset):
    n_in = array.shape[axis]
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5 + shift, 0, n_in - 1)
    first = np.floor(x).astype(np.intp)
    weight = (x - first).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    below = np.take(array, first, axis)
    array = below + weight * (np.take(array, np.minimum(first + 1, n_in - 1), axis) - below)
  return array


def _median_s(resize: Callable, array: np.ndarray, size: Sequence[int], offset: Sequence[float],
              repeats: int) -> tuple[float, np.ndarray]:
  out = resize(array, size, offset)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    resize(array, size, offset)
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--slices', type=positive_int, default=80,
                      help='sagittal slices (the 3D DESS grid: 80)')
  parser.add_argument('--scan', type=positive_int, default=512, help="the scan's in-plane pixels per axis")
  parser.add_argument('--network', type=positive_int, default=256,
                      help="the network's in-plane pixels per axis")
  parser.add_argument('--repeats', type=positive_int, default=5,
                      help='timed calls per case; the median is reported')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  scan, network = (args.scan, args.scan), (args.network, args.network)
  cases = {  # offsets as the third sub-pixel grid of `inference.class_probabilities` uses them
      'probabilities back to the scan': (rng.random((args.slices, *network, 3), np.float32), scan,
                                         (-0.5, 0.0)),
      "scan to the network's pixels": (rng.random((args.slices, *scan), np.float32), network,
                                       (0.5 * args.scan / args.network, 0.0))}
  results = {}
  for name, (array, size, offset) in cases.items():
    numpy_s, expected = _median_s(_numpy_resize, array, size, offset, args.repeats)
    fused_s, found = _median_s(inference._resize, array, size, offset, args.repeats)
    results[name] = {'from': list(array.shape), 'to': list(found.shape), 'numpy_s': round(numpy_s, 4),
                     'predict_s': round(fused_s, 4), 'speedup': round(numpy_s / fused_s, 1),
                     'max_abs_difference': float(np.abs(found - expected).max())}
  print(json.dumps({'cpus': os.cpu_count(), 'repeats': args.repeats, **results}))


if __name__ == '__main__':
  run_cli(main)
