"""The command line, `python -m easunet_jax` (or a checkout's `python main.py`): parse flags, then dispatch
on --mode. Everything else lives in the rest of the package."""

import errno
import os
import pathlib
import signal
import sys
import tempfile
import threading

from easunet_jax import environment

environment.configure()  # before jax is imported: it may start this process again
environment.check_own_configs()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import default  # noqa: E402
from easunet_jax import checkpoints, config_check, evaluate, parallel, predict, pretrained, train  # noqa: E402
from easunet_jax.data import preprocess  # noqa: E402
from easunet_jax.errors import ConfigError, UserError, exit_with, one_line  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Configuration file, e.g. configs/eas.py[:demo]; '
                                'without it, --mode=predict uses the shipped model.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config.name>.')
flags.DEFINE_enum('mode', 'train', ['train', 'preprocess', 'evaluate', 'predict', 'export'],
                  'train: train with periodic validation (builds the slice store when missing); '
                  'preprocess: only build the slice store; '
                  'evaluate: test-set report of the checkpoint eval.checkpoint names; '
                  'predict: segment --input into --output with that checkpoint (or --weights, or with '
                  'no --config the shipped model); '
                  'export: write that checkpoint to --output as one model file (.npz) for --weights.')
flags.DEFINE_string('input', None, 'predict: a NIfTI, MetaImage or NRRD file, a folder of DICOM files (one '
                    'series), or a directory of such files or of DICOM folders.')
flags.DEFINE_string('output', None, 'predict: the mask file (one input) or a directory (created); '
                    'export: the model file.')
flags.DEFINE_string('series', None, 'predict: the SeriesInstanceUID of the DICOM series to read when a '
                    'folder holds several (default: the one with most slices); <uid>:<echo> for one echo of '
                    'a multi-echo series (default: its first).')
flags.DEFINE_enum('laterality', None, ['left', 'right'], 'predict: the knee scanned, overriding the DICOM '
                  'Laterality tag or series description and the scan position.')
flags.DEFINE_bool('continue_prediction', False, 'predict: of a directory of scans, keep those that an '
                  'earlier run into the same --output finished with the same model and settings, and '
                  'segment the rest.')
flags.DEFINE_string('labels', None, 'predict: expert labels to score the masks against: the label map of '
                    "the one --input scan, or a directory of the scans' label maps (each named as its scan, "
                    "or <id> for nnU-Net's <id>_0000 images, with any volume suffix), read with "
                    'data.label_map.')
flags.DEFINE_bool('save_probabilities', False, "predict: also write each scan's class probabilities "
                  '(background, FC, TC) as a 4D NIfTI in its grid, beside its mask.')
flags.DEFINE_string('weights', None, 'predict: a model file of --mode=export; without --config, its own '
                    "config; with it, the config's predict settings; without either, the shipped model "
                    '(easunet_jax/weights/eas_knee.npz).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks of user errors.')
# JAX reads the coordinator's address from JAX_COORDINATOR_ADDRESS too, and all three from SLURM or Open MPI
# itself; the process count and id have no variable of their own, hence these flags for other launchers.
flags.DEFINE_string('coordinator_address', None, 'train.distributed: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'train.distributed: the number of processes.')
flags.DEFINE_integer('process_id', None, 'train.distributed: this process, 0 .. num_processes - 1.')
FLAGS = flags.FLAGS


# What a stop left on disk, in each mode where Ctrl-C ends the run (training saves a checkpoint instead).
_AFTER_A_STOP = {
    'predict': ': the scans finished are in --output; of a directory of scans, the same command with '
               '--continue_prediction segments the rest',
    'preprocess': ': no slice store written (nothing half-built is kept)',
    'evaluate': ': no report written',
    'export': ': no model file written',
}


# What a full disk, a folder that cannot be written, or a file where a folder is to be made (a broken link,
# a file named as a folder the run makes: slices/, measures/) raises: the machine's state or a path to
# correct, not a bug.
_NOT_WRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOTDIR, errno.EEXIST)


class _Terminated(BaseException):
  """A SIGTERM (a scheduler's stop or time limit, `kill`) outside a training loop, which saves and stops by
  itself: raised where the work stands, as Ctrl-C's KeyboardInterrupt is, so that it ends in one line."""


# A stop raised in the main thread can land in a callback that swallows it (asyncio's, as orbax reads a
# checkpoint; the garbage collector's): the work then hangs, or ends as if never stopped. A watchdog ends the
# process this long after the signal, wherever the exception went.
_STOP_GRACE_S = 30.0


def _stopped(signum, frame):
  """SIGINT or SIGTERM outside a training loop (which saves and stops by itself): KeyboardInterrupt or
  _Terminated raised where the work stands, so that it ends in one line, and a watchdog (`_STOP_GRACE_S`)."""
  del frame
  name = 'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'

  def end_now():
    try:  # a raw write: the hung main thread may hold sys.stderr's lock, or stderr be a closed pipe
      os.write(2, f'stopped ({name}): the work had not ended {_STOP_GRACE_S:g} s after the signal; ended '
               'now\n'.encode())
    finally:
      os._exit(128 + signum)

  watchdog = threading.Timer(_STOP_GRACE_S, end_now)
  watchdog.daemon = True  # a stop that ends the work ends the process at once
  watchdog.start()
  raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated


def _start_backend() -> int:
  """Starts JAX's backend and returns this process's index; where JAX_PLATFORMS names platforms that cannot
  start here (cuda on a node without a GPU, where JAX fails a bare assertion), one line instead."""
  try:
    return jax.process_index()
  except (RuntimeError, AssertionError) as e:
    if not jax.config.jax_platforms:  # JAX's own choice failed: a broken install, its traceback
      raise
    reason = one_line(e) if str(e) else 'no NVIDIA GPU is visible'  # the one platform JAX skips silently
    gpu = {'cuda', 'gpu'} & set(jax.config.jax_platforms.split(','))
    hint = 'unset JAX_PLATFORMS' + (', or install jax with CUDA on a GPU node' if gpu else '')
    exit_with(ConfigError(f'JAX found no backend for JAX_PLATFORMS={jax.config.jax_platforms} ({reason}); '
                          f'{hint}'))


def _keep_compiled_programs(workdir: str, model_file: str | pathlib.Path | None) -> None:
  """Keeps compiled programs, and on GPUs XLA's autotuning results with them, in a folder where later starts
  and the other points of a sweep read them back: JAX_COMPILATION_CACHE_DIR, or beside the workdir, or for a
  model file's predict, which has no workdir, in the user's cache (not in the folder it was started in).
  Where that folder cannot be made or written, one warning line, and no cache: JAX would warn at every
  program."""
  if jax.config.jax_compilation_cache_dir:
    cache, other = pathlib.Path(jax.config.jax_compilation_cache_dir), ''
  elif model_file:
    user_cache = pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache')
    cache, other = user_cache / 'easunet_jax' / 'jax', ', or XDG_CACHE_HOME'
  else:
    cache, other = pathlib.Path(workdir).absolute().parent / '.jax_cache', ', or --workdir'
  try:
    cache.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=cache).close()
  except OSError as e:
    logging.warning('%s: compiled programs cannot be kept there (%s), so each run compiles them again; set '
                    'JAX_COMPILATION_CACHE_DIR to a folder that can be written%s', cache, e.strerror, other)
    jax.config.update('jax_enable_compilation_cache', False)
    return
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


_PATH_FLAGS = ('workdir', 'input', 'output', 'labels', 'weights')
# The flags only --mode=predict reads (and --output, which export reads too), refused in the other modes.
_PREDICT_FLAGS = ('labels', 'input', 'series', 'laterality', 'continue_prediction', 'save_probabilities')
_PATH_FIELDS = (('data', 'root'), ('data', 'cache_dir'), ('data', 'phantom_dir'), ('data', 'split_file'),
                ('train', 'init_weights'))


def main(argv):
  del argv  # config_check.parse_flags refused any argument that is not a flag
  logging.get_absl_handler().python_handler.addFilter(checkpoints.quiet_libraries)
  # A path not in the locale's encoding (a Latin-1 folder name from a Windows export, held as surrogates)
  # is printed escaped, as stderr prints it, instead of stopping a run with UnicodeEncodeError.
  sys.stdout.reconfigure(errors='backslashreplace')
  # A shell expands ~ only at a word's start, not after --flag=: expanded here, one home for every path.
  for name in _PATH_FLAGS:
    if FLAGS[name].value:
      FLAGS[name].value = os.path.expanduser(FLAGS[name].value)
  config, model_file = FLAGS.config, None
  for group, field in _PATH_FIELDS:
    if config is not None and isinstance(config[group][field], str):
      config[group][field] = os.path.expanduser(config[group][field])
  if config is None or FLAGS.weights:
    if FLAGS.mode != 'predict':
      exit_with(ConfigError(
          '--config is needed, except by --mode=predict (which may take --weights, and without either uses '
          'the shipped model)' if config is None else
          '--weights is for --mode=predict; a run starts from a model file with --config.train.init_weights'))
    if FLAGS.workdir:  # it would go unused: the model is the file's
      exit_with(ConfigError(
          f'--workdir={FLAGS.workdir} and --weights={FLAGS.weights} name two models: give one'
          if FLAGS.weights else f'--workdir={FLAGS.workdir}: predict from a workdir needs the --config it '
          'was trained with (without --config and --weights, predict uses the shipped model)'))
    model_file = FLAGS.weights or pretrained.SHIPPED
    try:
      config = pretrained.config_of(model_file, config)
    except UserError as e:
      exit_with(e)
  # Predict and export run in one process: a model file trained on several hosts keeps the setting.
  if config.train.distributed and FLAGS.mode in ('predict', 'export'):
    logging.warning('train.distributed is for training, evaluation and preprocessing; --mode=%s runs in '
                    'this process alone', FLAGS.mode)
  elif config.train.distributed:
    try:
      parallel.join_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ConfigError as e:
      exit_with(e)
  if not config.train.distributed or FLAGS.mode in ('predict', 'export'):  # else JAX's preemption service's
    signal.signal(signal.SIGTERM, _stopped)
  # Where SIGINT is ignored (a command a non-interactive shell put in the background), it stays so.
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _stopped)
  if _start_backend() > 0:  # process 0 speaks for all: progress lines, validation and reports
    logging.set_verbosity(logging.WARNING)
  workdir = FLAGS.workdir or os.path.join('runs', config.name)
  try:
    config_check.check_config(config, default.get_config(), FLAGS.mode)
    if FLAGS.mode == 'predict' and not (FLAGS.input and FLAGS.output):
      raise ConfigError('--mode=predict needs --input and --output')
    # Given (a value, not an explicit false: a flag file shared by the modes may hold --nosave_probabilities)
    # where they would go unused.
    if FLAGS.mode != 'predict' and (unused := [name for name in _PREDICT_FLAGS if FLAGS[name].value] + (
        ['output'] if FLAGS.output and FLAGS.mode != 'export' else [])):
      raise ConfigError(
          '--labels scores the masks of --mode=predict; --mode=evaluate scores the test split against its '
          'own labels' if unused[0] == 'labels' else f'--{unused[0]} is for --mode=predict'
          f"{' and --mode=export' if unused[0] == 'output' else ''}, not --mode={FLAGS.mode}")
    if FLAGS.mode == 'export':
      config_check.check_export_output(FLAGS.output)
    if not model_file and (file := config_check.file_in_the_way(workdir)):
      raise ConfigError(f'--workdir={workdir}: {file}; expected a folder (made if missing)')
    # The modes that write into the workdir (predict and export read its checkpoints alone).
    if FLAGS.mode in ('train', 'preprocess', 'evaluate') and (
        part := config_check.workdir_part_in_the_way(workdir, config.data.cache_dir)):
      raise ConfigError(f'--workdir={workdir}: {part}, where runs keep their own; move it away')
    if FLAGS.mode in ('evaluate', 'export') or (FLAGS.mode == 'predict' and not model_file):
      checkpoints.trained_directory(workdir)  # a mistyped workdir: one line, and no folders made for it
    # Before anything compiles (the checks above compile nothing): JAX decides at its first compilation.
    _keep_compiled_programs(workdir, model_file)
    logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
                 jax.devices())
    if FLAGS.mode == 'preprocess':
      with parallel.process_0_first('slice store built'):
        preprocess.prepare_data(config, workdir)
    elif FLAGS.mode == 'evaluate':
      evaluate.evaluate(config, workdir)
    elif FLAGS.mode == 'predict':
      predict.predict(config, None if model_file else workdir, FLAGS.input, FLAGS.output, model_file,
                      series=FLAGS.series, laterality=FLAGS.laterality and FLAGS.laterality[0].upper(),
                      continue_prediction=FLAGS.continue_prediction, labels=FLAGS.labels,
                      save_probabilities=FLAGS.save_probabilities)
    elif FLAGS.mode == 'export':
      meta = pretrained.export(config, workdir, FLAGS.output)
      print(f'{FLAGS.output}: step {meta["step"]} of {workdir}, pixel {meta["pixel_mm"]} mm')
    else:
      train.train_and_evaluate(config, workdir)
  except UserError as e:  # what the user can fix, in one line; any other exception is a bug: traceback
    if FLAGS.verbose:
      raise
    exit_with(e)
  except OSError as e:
    if FLAGS.verbose or e.errno not in _NOT_WRITABLE:
      raise
    where = e.filename or (FLAGS.output if FLAGS.mode in ('predict', 'export') else workdir)
    exit_with(UserError(f'{where}: {e.strerror}'))
  except train.Stopped as e:  # the log said where it saved and how to resume
    sys.exit(e.exit_code)
  except (KeyboardInterrupt, _Terminated) as e:  # training saves and stops by itself; elsewhere no bug either
    if FLAGS.verbose:
      raise
    ctrl_c = isinstance(e, KeyboardInterrupt)
    print(f'stopped ({"Ctrl-C" if ctrl_c else "SIGTERM"}){_AFTER_A_STOP.get(FLAGS.mode, "")}',
          file=sys.stderr)
    sys.exit(128 + (signal.SIGINT if ctrl_c else signal.SIGTERM))  # as a shell reports a command so ended


if __name__ == '__main__':
  app.run(main, flags_parser=config_check.parse_flags)
