"""Training-step time of a config's network on random slices; the last line printed is one JSON object.

  python bench/train_step.py --config=configs/eas.py --batch=4 --size=384 [--config.model.dtype=bfloat16]
      [--cache_dir=/tmp/jax-cache]

Fields as `../shared/bench/torch_bench.py` prints them (`train_step_ms_median`, `train_slices_per_s`) plus
`compile_s` (tracing and compiling the step; with --cache_dir a second run reads it from JAX's persistent
compilation cache), `device` and `dtype`. `bench/compare_torch.py` runs it beside the PyTorch reference.
Set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting it, as main.py does for itself.
"""

import os
import sys

if '--xla_cpu_enable_concurrency_optimized_scheduler' not in os.environ.get('XLA_FLAGS', ''):
  # As in main.py: the default scheduler doubles the step's scratch memory on XLA:CPU.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_concurrency_optimized_scheduler=false').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json
import time

import jax
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from easunet_jax import train
from easunet_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/eas.py', 'Configuration file.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Global batch.')
_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', '', "JAX's persistent compilation cache; '' = none.")


def main(argv):
  del argv
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = _CONFIG.value
  batch_size, size = _BATCH.value, _SIZE.value
  mesh = train.make_mesh()
  tx = train.make_optimizer(config.optim, num_steps=1000)
  train_graphdef, eval_graphdef, state = train.create_train_state(config, tx, NamedSharding(mesh, P()))
  p_train_step, _ = train.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  rng = np.random.default_rng(0)
  batch = pipeline.put_on_mesh({
      'image': rng.random((batch_size, size, size, 1), np.float32),
      'label': rng.integers(0, config.model.num_classes, (batch_size, size, size)).astype(np.int32)},
      NamedSharding(mesh, P('data')))

  start = time.perf_counter()
  step = p_train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  print(json.dumps({
      'framework': 'jax', 'model': config.model.name, 'features': list(config.model.features),
      'depthwise_impl': config.model.depthwise_impl, 'dtype': config.model.dtype, 'batch': batch_size,
      'size': size, 'device': f'{jax.default_backend()}:{jax.devices()[0].device_kind}',
      'devices': jax.device_count(), 'compile_s': round(compile_s, 1),
      'train_step_ms_median': round(step_s * 1e3, 1), 'train_slices_per_s': round(batch_size / step_s, 3),
      'steps': _STEPS.value, 'warmup': _WARMUP.value,
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}))


if __name__ == '__main__':
  app.run(main)
