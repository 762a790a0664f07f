"""Test set-up: four virtual CPU devices, the process settings main.py runs with and a compilation cache for
the session (all set before jax is imported, and inherited by the main.py processes tests start), and parsed
absl flags (Grain's worker processes read them). A program compiled once, by a test or by a main.py process
(the tiny train step, say), is read from the cache by the others."""

import os
import tempfile

from easunet_jax import environment

# The same XLA flags as main.py's (the cache keys include them); child processes also get glibc's setting,
# so main.py does not start itself again.
os.environ.update(environment.with_settings(os.environ))
os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4'
os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='easunet_jax_cache_')

import jax
import pytest
from absl import flags

from configs import tiny
from easunet_jax import train

flags.FLAGS.mark_as_parsed()

jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def trained_tiny(tmp_path_factory):
  """(config, workdir) of a trained tiny run (its phantom beside the workdir) that tests only read:
  evaluation and prediction. Two of its four phantom volumes are the test set, so test means are over two
  cases."""
  config = tiny.get_config()
  config.data.split = (0.25, 0.25, 0.5)
  workdir = tmp_path_factory.mktemp('trained') / 'tiny'
  train.train_and_evaluate(config, workdir)
  return config, workdir
