"""Test set-up: four virtual CPU devices with XLA's backend optimisation off, the process settings main.py
runs with, and a compilation cache for the session (all set before jax is imported, and inherited by the
main.py processes tests start and by pytest-xdist's workers), and parsed absl flags (Grain's worker processes
read them). A program compiled once, by a test, a main.py process or another worker (the tiny train step,
say), is read from the cache by the others. Under pytest-xdist (the README's `-n 2`) each test module runs
whole on one worker, so its fixtures are made once; the modules that read one of the session's trained tiny
runs share a worker, so it trains once."""

import os
import pathlib
import shutil
import tempfile

from easunet_jax import environment

# The same XLA flags as main.py's (the cache keys include them); child processes also get glibc's setting,
# so main.py does not start itself again.
os.environ.update(environment.with_settings(os.environ))
if 'PYTEST_XDIST_WORKER' not in os.environ:  # a worker inherits its controller's environment
  # XLA's backend optimisation off: the suite compiles many programs and runs each briefly, so compiling
  # dominates (the whole suite 437 s against 500-525 s here). The programs compute the same values to
  # rounding; the one test this moved exposed a real fault (max_pool_2x2's gradient, see its docstring).
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0'
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='easunet_jax_cache_')

import jax
import pytest
from absl import flags

from configs import tiny
from easunet_jax import atomic, train

flags.FLAGS.mark_as_parsed()

# The modules that use each session-scoped run: pytest-xdist runs them on one worker, which trains it once.
RUN_READERS = {'tests/test_evaluate.py': 'trained_tiny', 'tests/test_predict.py': 'trained_tiny',
               'tests/test_main.py': 'augmented_tiny', 'tests/test_train.py': 'augmented_tiny',
               'tests/test_distributed.py': 'augmented_tiny'}

jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def pytest_unconfigure(config: pytest.Config) -> None:
  """The controlling process removes the session's compilation cache (about 8 MB), after the workers
  have ended."""
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
  """pytest-xdist's scheduling by module, with the modules that read one session-scoped run as one."""
  from xdist.scheduler import LoadFileScheduling  # only called under pytest-xdist

  class Scheduling(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
      module = super()._split_scope(nodeid)
      return RUN_READERS.get(module, module)

  return Scheduling(config, log)


@pytest.fixture
def dead_mark():
  """`atomic.mark(prefix)` of a process of this machine that is gone: (prefix, pid=an id no process has)."""
  def mark(prefix: str, pid: int = 999999999) -> str:
    return atomic.mark(prefix).replace(f'-{os.getpid()}.', f'-{pid}.')
  return mark


@pytest.fixture
def killed_mid_write(monkeypatch):
  """`pathlib.Path.write_text` killed half way: half the text written, then KeyboardInterrupt."""
  def write_half(self, text, **kwargs):
    pathlib.Path.write_bytes(self, text[:len(text) // 2].encode())
    raise KeyboardInterrupt

  monkeypatch.setattr(pathlib.Path, 'write_text', write_half)


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


@pytest.fixture(scope='session')
def augmented_tiny(tmp_path_factory):
  """(config, workdir, final state) of a tiny run (its phantom beside the workdir) that killed and resumed
  runs, and a run of two processes, must end like: with augmentation, whose random stream they must
  continue, and a checkpoint every 2 steps. Tests only read it.

  Its learning rate is tiny's / 100: tiny's amplifies rounding, so that runs whose cross-device sums add in
  another order part by 2e-2 in the parameters after 4 steps at 0.01 (one process on two devices against
  four) and by 8e-4 after 6 at 0.001 (two processes against one; both without augmentation). At 1e-4 two
  processes and one part by 3e-8 after 6 steps, while the parameters move by 7e-4 from step 4 to 6 (CPU,
  constant rate). It decays by the poly schedule, which a resumed run must resume too."""
  root = tmp_path_factory.mktemp('augmented')
  config = tiny.get_config()
  config.data.phantom_dir = str(root / 'phantom')
  config.data.augment = True
  config.checkpoint.every_steps = 2
  config.optim.lr = 1e-4
  config.optim.schedule = 'poly'
  return config, root / 'run', train.train_and_evaluate(config, root / 'run')
