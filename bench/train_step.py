"""Training-step and inference throughput of a config's network on random slices; one JSON line.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/train_step.py --config=configs/eas.py \
      --batch=4 --size=384 --steps=10 --warmup=3

Compare with `../shared/bench/torch_bench.py` (same batch, size and environment), run back to back: on
shared machines single figures move by up to 2x, ratios of neighbouring runs much less.
"""

import os
import sys

if '--xla_cpu_enable_concurrency_optimized_scheduler' not in os.environ.get('XLA_FLAGS', ''):
  # As in main.py: the default scheduler doubles the step's scratch memory on XLA:CPU.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from easunet_jax import train  # noqa: E402
from easunet_jax.data import pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/eas.py', 'Configuration file.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Global batch.')
_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps first (compilation included).')


def _median_seconds(fn, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  config = _CONFIG.value
  batch_size, size = _BATCH.value, _SIZE.value
  mesh = train.make_mesh()
  tx = train.make_optimizer(config.optim, num_steps=1000)
  train_graphdef, eval_graphdef, state = train.create_train_state(config, tx, NamedSharding(mesh, P()))
  p_train_step, p_eval_step = train.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  rng = np.random.default_rng(0)
  batch = pipeline.put_on_mesh({
      'image': rng.random((batch_size, size, size, 1), np.float32),
      'label': rng.integers(0, config.model.num_classes, (batch_size, size, size)).astype(np.int32),
      'mask': np.ones((batch_size,), bool)}, NamedSharding(mesh, P('data')))
  train_batch = {k: batch[k] for k in ('image', 'label')}

  def one_train_step():
    nonlocal state
    state, metrics = p_train_step(state, train_batch)
    return metrics

  train_s = _median_seconds(one_train_step, _WARMUP.value, _STEPS.value)
  infer_s = _median_seconds(lambda: p_eval_step(state, batch), _WARMUP.value, _STEPS.value)
  print(json.dumps({
      'model': config.model.name, 'features': list(config.model.features),
      'depthwise_impl': config.model.depthwise_impl, 'dtype': config.model.dtype,
      'batch': batch_size, 'size': size, 'backend': jax.default_backend(),
      'devices': jax.device_count(), 'train_step_s': round(train_s, 4),
      'train_slices_per_s': round(batch_size / train_s, 3),
      'infer_slices_per_s': round(batch_size / infer_s, 3),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}))


if __name__ == '__main__':
  app.run(main)
