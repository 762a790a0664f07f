"""Seconds of successive `predict.predict` calls of the shipped model in one process (a notebook's loop):
the first compiles the network for the scan's slice shape, the next ones reuse it (`inference._PROGRAMS`).

python bench/predict_calls.py [--slices 8] [--size 96] [--calls 3]: segments one phantom scan of `--slices`
sagittal slices of `--size`^2 pixels (8 mm x 1.4 mm, as the test of the shipped model's first command)
`--calls` times and prints one JSON line with each call's seconds and compile seconds.
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

from easunet_jax import predict, pretrained
from easunet_jax.data import phantom, volumes
from easunet_jax.errors import positive_int, run_cli


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--slices', type=positive_int, default=8, help='sagittal slices of the scan')
  parser.add_argument('--size', type=positive_int, default=96, help='in-plane pixels per axis')
  parser.add_argument('--calls', type=positive_int, default=3, help='predict.predict calls')
  args = parser.parse_args()
  config = pretrained.config_of(pretrained.SHIPPED)
  with tempfile.TemporaryDirectory() as folder:
    scan = pathlib.Path(folder) / 'scan.nii.gz'
    image, _, affine = phantom.make_subject(11, (args.slices, args.size, args.size), (8.0, 1.4, 1.4))
    volumes.save_volume(scan, image, affine)
    calls = []
    for i in range(args.calls):
      start = time.perf_counter()
      [result] = predict.predict(config, None, scan, pathlib.Path(folder) / f'mask{i}.nii.gz',
                                 pretrained.SHIPPED)
      calls.append({'seconds': round(time.perf_counter() - start, 2),
                    'compile_s': round(result['compile_s'], 2)})
  print(json.dumps({'cpus': os.cpu_count(), 'scan': [args.slices, args.size, args.size], 'calls': calls}))


if __name__ == '__main__':
  run_cli(main)
