"""Time of a config's training step or evaluation-mode forward pass on random slices over all devices; the
last line printed is one JSON object.

  python bench/step_time.py --step=train --config=configs/eas.py --batch=4 --size=384 [--cache_dir=DIR]
  python bench/step_time.py --step=inference --config=configs/eas.py --batch=4 --size=384
      [--config.model.dtype=bfloat16]

Fields as `torch_bench.py` of the PyTorch reference prints them (`train_step_ms_median` and
`train_slices_per_s`, or `infer_ms_median` and `infer_slices_per_s`) plus `compile_s` (tracing and
compiling; with --cache_dir a second run reads the program from JAX's persistent compilation cache),
`device` and `dtype`. `bench/compare_torch.py` runs it beside the reference. It sets the process up as
main.py does (`environment.configure`).
"""

from easunet_jax import environment

environment.configure()

import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from easunet_jax import parallel, steps  # noqa: E402
from easunet_jax.data import pipeline  # noqa: E402
from easunet_jax.models import stride  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'eas.py'), 'Configuration file.')
_STEP = flags.DEFINE_enum('step', 'train', ['train', 'inference'], 'What is timed.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Global batch.', lower_bound=1)
_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width (a multiple of the network\'s stride).',
                            lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', lower_bound=0)
_CACHE_DIR = flags.DEFINE_string('cache_dir', '', "JAX's persistent compilation cache; '' = none.")


def main(argv):
  del argv
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  config = _CONFIG.value
  batch_size, size = _BATCH.value, _SIZE.value
  if size % (multiple := stride(config.model.features)):
    raise app.UsageError(f'--size={size}: not a multiple of the network\'s stride, {multiple}')
  mesh = parallel.make_mesh()
  data_sharding, replicated = parallel.shardings(mesh)
  tx = steps.make_optimizer(config.optim, num_steps=1000)
  train_graphdef, eval_graphdef, state = steps.create_train_state(config, tx, replicated)
  rng = np.random.default_rng(0)
  # The slice store's dtypes, as the training loop sends them.
  batch = pipeline.put_on_mesh({
      'image': rng.random((batch_size, size, size, 1)).astype(np.float16),
      'label': rng.integers(0, config.model.num_classes, (batch_size, size, size)).astype(np.uint8)},
      data_sharding)
  if _STEP.value == 'train':
    step = steps.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)[0]
    args, prefix = (state, batch), 'train_step'
  else:
    step = jax.jit(functools.partial(steps.forward, graphdef=eval_graphdef))
    args, prefix = (state, batch['image'].astype(np.float32)), 'infer'

  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(_WARMUP.value + _STEPS.value):
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    if _STEP.value == 'train':
      args = (out[0], batch)  # the step donated the state it was given
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  slices_key = 'train_slices_per_s' if _STEP.value == 'train' else 'infer_slices_per_s'
  print(json.dumps({
      'framework': 'jax', 'step': _STEP.value, 'model': config.model.name,
      'features': list(config.model.features), 'depthwise_impl': config.model.depthwise_impl,
      'dtype': config.model.dtype, 'batch': batch_size, 'size': size,
      'device': f'{jax.default_backend()}:{jax.devices()[0].device_kind}', 'devices': jax.device_count(),
      'jax': jax.__version__, 'flax': importlib.metadata.version('flax'),
      'compile_s': round(compile_s, 1), f'{prefix}_ms_median': round(step_s * 1e3, 1),
      slices_key: round(batch_size / step_s, 3), 'steps': _STEPS.value, 'warmup': _WARMUP.value,
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}))


if __name__ == '__main__':
  app.run(main)
