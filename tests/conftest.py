"""Test set-up: four virtual CPU devices (set before jax is imported), parsed absl flags (Grain's worker
processes read them), and a compilation cache shared by the tests of one session, so that a program
compiled by one test (the tiny train step, say) is not compiled again by the next."""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()

import jax
from absl import flags

flags.FLAGS.mark_as_parsed()

jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='easunet_jax_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
