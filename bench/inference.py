"""Inference (evaluation-mode forward) time of a config's network on random slices; one JSON line, last.

  python bench/inference.py --config=configs/eas.py --batch=4 --size=384 [--config.model.dtype=bfloat16]

Fields as `../shared/bench/torch_bench.py` prints them (`infer_ms_median`, `infer_slices_per_s`) plus
`compile_s`, `device` and `dtype`. Set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting it.
"""

import os
import sys

if '--xla_cpu_enable_concurrency_optimized_scheduler' not in os.environ.get('XLA_FLAGS', ''):
  # As in main.py, so that both benchmarks see the program main.py runs.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from easunet_jax import train
from easunet_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/eas.py', 'Configuration file.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Slices per forward pass.')
_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed forward passes (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed forward passes after compilation.')


def main(argv):
  del argv
  config = _CONFIG.value
  batch_size, size = _BATCH.value, _SIZE.value
  mesh = train.make_mesh()
  tx = train.make_optimizer(config.optim, num_steps=1000)
  _, eval_graphdef, state = train.create_train_state(config, tx, NamedSharding(mesh, P()))
  image = pipeline.put_on_mesh(
      {'image': np.random.default_rng(0).random((batch_size, size, size, 1), np.float32)},
      NamedSharding(mesh, P('data')))['image']

  def forward(state: train.TrainState, image_BHW1: jax.Array) -> jax.Array:
    return nnx.merge(eval_graphdef, state.params, state.batch_stats)(image_BHW1)

  start = time.perf_counter()
  compiled = jax.jit(forward).lower(state, image).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, image))
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  forward_s = float(np.median(times))
  print(json.dumps({
      'framework': 'jax', 'model': config.model.name, 'features': list(config.model.features),
      'depthwise_impl': config.model.depthwise_impl, 'dtype': config.model.dtype, 'batch': batch_size,
      'size': size, 'device': f'{jax.default_backend()}:{jax.devices()[0].device_kind}',
      'devices': jax.device_count(), 'compile_s': round(compile_s, 1),
      'infer_ms_median': round(forward_s * 1e3, 1), 'infer_slices_per_s': round(batch_size / forward_s, 3),
      'steps': _STEPS.value, 'warmup': _WARMUP.value,
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}))


if __name__ == '__main__':
  app.run(main)
