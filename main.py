"""Entry point: parse flags, then dispatch on --mode. Everything else lives in the easunet_jax package."""

import os
import sys

# Set before jax is imported: XLA:CPU's concurrency-optimised scheduler more than doubles the scratch
# memory of a training step (batch 16 at 384 x 384 would not fit in 24 GB with it).
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_enable_concurrency_optimized_scheduler=false')

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from easunet_jax import train  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Configuration file, e.g. configs/eas.py[:demo].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config.name>.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to do.')
flags.DEFINE_bool('verbose', False, 'Show tracebacks of user errors.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def _quiet_libraries(record) -> bool:
  """Drops the INFO chatter of orbax and the TPU probe, keeping their warnings and errors."""
  return record.levelno >= logging.converter.STANDARD_WARNING or not any(
      part in record.pathname for part in ('/orbax/', 'xla_bridge.py'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
  config = FLAGS.config
  if config.train.distributed:
    jax.distributed.initialize()
  workdir = FLAGS.workdir or os.path.join('runs', config.name)
  logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  try:
    train.train_and_evaluate(config, workdir)
  except USER_ERRORS as e:
    if FLAGS.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
