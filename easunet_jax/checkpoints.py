"""Orbax checkpoints in `<workdir>/checkpoints/<step>/`: the train state (its step is the data's position:
one batch a step) and the config. Training saves and resumes; evaluation and prediction restore the step
`eval.checkpoint` names. The latest `keep` steps are kept, and the best by validation mean cartilage Dice.

A kill at any moment leaves only whole checkpoints under step names: orbax writes each step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, and a step it drops is first renamed into
`checkpoints/deleting/` and only then removed.
"""

import contextlib
import logging
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from configs import default
from easunet_jax import parallel
from easunet_jax.errors import CheckpointError, ConfigError, one_line

BEST_METRIC = 'val/dice_mean'
# Fields of the `model` group that choose only how the network is computed, not its weights: a checkpoint
# serves any of them. Every other field must match the checkpoint's.
COMPUTE_ONLY_FIELDS = ('dtype', 'depthwise_impl')
_DELETING = 'deleting'
# What orbax names a step while it writes it (<step>.orbax-checkpoint-tmp-<time>), renamed when complete.
_HALF_WRITTEN = '.orbax-checkpoint-tmp'

# Orbax's default, replica-parallel saving, slices every replicated array into one piece per device, and
# each new slice shape compiles a small program: a process's first save spent most of its time compiling
# them (docs/performance.md). One replica writes each array instead. (Orbax warns that the default is
# replaced; at import, before logging is set up, that would be a stray line on stderr.)
_absl_logger = logging.getLogger('absl')
_level = _absl_logger.level
_absl_logger.setLevel(logging.ERROR)
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
_absl_logger.setLevel(_level)


def _score(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def manager(workdir: str | pathlib.Path, keep: int, *, for_training: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager. `for_training` also removes what a killed run left half-written
  (a reader must not: a training run may be saving beside it)."""
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
  ])
  # The preservation policy decides what is kept; best_fn makes orbax write each step's metrics to
  # disk (without it they live only in memory, and a resumed run would forget which step was best).
  # Saving is synchronous: a SIGTERM or a kill then never races a save still in flight. Half-written steps
  # are removed here, not by orbax's cleanup_tmp_directories, which runs in a thread of its own that a run
  # ending at once (an error at start-up) leaves to fail at the interpreter's exit, a traceback on stderr.
  options = ocp.CheckpointManagerOptions(preservation_policy=preservation, best_fn=_score,
                                         best_mode='max', create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=False, todelete_subdir=_DELETING)
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  if for_training and jax.process_index() == 0:
    for half_written in directory.glob(f'*{_HALF_WRITTEN}*'):
      shutil.rmtree(half_written, ignore_errors=True)
  mngr = ocp.CheckpointManager(directory, options=options)
  if for_training:
    _empty_deleting(mngr)
  return mngr


def _empty_deleting(mngr: ocp.CheckpointManager) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(pathlib.Path(mngr.directory) / _DELETING, ignore_errors=True)


# How a full disk reads in the errors of a write (strerror of ENOSPC and EDQUOT).
DISK_FULL = ('No space left on device', 'Disk quota exceeded')


def quiet_libraries(record: logging.LogRecord) -> bool:
  """The log's filter (the terminal's and train.log's): drops the INFO chatter of orbax and JAX's TPU probe,
  orbax's warning at every checkpoint saved between validations (those carry no Dice by design) and its (and
  asyncio's) tracebacks of a full disk (the run ends with a line that says so), keeping all other warnings
  and errors."""
  message = record.getMessage()
  if message.startswith('Requested `tracked_metric`') or (
      ('/orbax/' in record.pathname or record.name == 'asyncio')
      and any(text in message for text in DISK_FULL)):
    return False
  return record.levelno >= logging.WARNING or not any(
      part in record.pathname for part in ('/orbax/', 'xla_bridge.py'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: ml_collections.ConfigDict,
         metrics: dict[str, float] | None = None) -> None:
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
  _drop_closed_loop_errors()  # a failed write (a full disk) leaves others in flight
  try:
    mngr.save(step, args=args, metrics=metrics, force=True)
  except (ValueError, OSError) as e:  # tensorstore's write errors are ValueErrors, orbax's own OSErrors
    full = next((text for text in DISK_FULL if text in str(e)), None)
    if full is None:
      raise
    # The next start removes the half-written step.
    raise CheckpointError(f'{mngr.directory / str(step)}: {full} while saving; free space and run the same '
                          'command to resume from the last checkpoint') from None
  _empty_deleting(mngr)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The train state of `step`, laid out like `abstract_state`."""
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The config (as a plain dict) that `step` was saved with."""
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def check_same_model(saved: dict, model_cfg: ml_collections.ConfigDict, source: pathlib.Path, *,
                     instead: str) -> None:
  """Refuses a checkpoint or model file (`source`) trained with another network than `model_cfg`
  describes, naming both; the message offers `instead` (e.g. 'another workdir') as the other way out."""
  # A field the file predates: it was trained as the field's default behaves.
  trained = {**default.get_config().model.to_dict(), **saved.get('model', {})}
  fields = [k for k in model_cfg if k not in COMPUTE_ONLY_FIELDS]
  differ = [k for k in fields if _plain(trained.get(k)) != _plain(model_cfg.get(k))]
  if differ:
    shown = dict.fromkeys(['name', *differ])

    def describe(group) -> str:
      return ', '.join(f'{k}={_plain(group.get(k))}' for k in shown)

    raise CheckpointError(f'{source} was trained with model {describe(trained)} but the config asks for '
                          f'{describe(model_cfg)}; use the config it was trained with, or {instead}')


def check_same_split(saved: dict, config: ml_collections.ConfigDict, source: pathlib.Path) -> None:
  """Refuses to resume or evaluate a checkpoint (`source`) under another split of the cases than it was
  trained with (seed and data.split, unless a data.split_file gives the split, whose path may move), or
  without the data.root it was trained on (whose path may move too): its validation and test cases would
  then hold cases it trained on."""
  def split(cfg) -> dict:
    if cfg['data'].get('split_file'):
      return {'data.split_file': 'given'}
    return {'seed': cfg['seed'], 'data.split': _plain(cfg['data']['split'])}

  # A data.root left out of the command: the built-in phantom would be generated and its store built first.
  if (root := saved['data'].get('root')) and not config.data.root:
    raise CheckpointError(f'{source} was trained on data.root={root}, and data.root is unset (the built-in '
                          f'phantom): give --config.data.root={root}')
  trained, asked = split(saved), split(config)
  if trained != asked:
    def describe(group: dict) -> str:
      return ', '.join(f'{k}={v}' for k, v in group.items())

    raise CheckpointError(f'{source} was trained on the cases split by {describe(trained)} but the config '
                          f'splits them by {describe(asked)}, which would validate and test on cases it '
                          'trained on; use the values it was trained with, or another workdir')


def check_same_label_map(saved: dict, config: ml_collections.ConfigDict, source: pathlib.Path) -> None:
  """Refuses to resume a checkpoint (`source`) under another data.label_map than it was trained with: its
  classes would go on learning other labels (FC and TC swapped, a plate merged into another) from where
  they stopped. (Evaluation and prediction may map another data set's values to the same classes.)"""
  trained = sorted(map(tuple, saved['data'].get('label_map', default.get_config().data.label_map)))
  asked = sorted(map(tuple, config.data.label_map))
  if trained != asked:
    raise CheckpointError(f'{source} was trained with data.label_map={tuple(trained)} but the config gives '
                          f'{tuple(asked)}, whose classes are other labels; resume with the label map it was '
                          'trained with, or start another workdir (from its weights: --mode=export, then '
                          '--config.train.init_weights=<the exported file>)')


def _plain(value):
  """JSON and ConfigDict spell sequences as lists or tuples: compare and print them one way."""
  return tuple(value) if isinstance(value, list | tuple) else value


def _requested_step(mngr: ocp.CheckpointManager, requested: str | int) -> int:
  """The step that eval.checkpoint ('best' | 'latest' | a step number) names in `mngr`."""
  directory = mngr.directory
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f'no checkpoint in {directory}: train this workdir first')
  requested = str(requested)
  if requested == 'latest':
    return mngr.latest_step()
  if requested == 'best':
    step = mngr.best_step()
    if step is None:
      raise CheckpointError(f'no checkpoint in {directory} has validation metrics to pick the best from; '
                            'pass --config.eval.checkpoint=latest or a step')
    return step
  if not requested.isdigit():
    raise ConfigError(f"eval.checkpoint: expected 'best', 'latest' or a step number, got {requested!r}")
  if int(requested) not in steps:
    raise CheckpointError(f'eval.checkpoint: step {requested} is not in {directory} (steps: '
                          f'{", ".join(map(str, sorted(steps)))})')
  return int(requested)


def trained_directory(workdir: str | pathlib.Path) -> pathlib.Path:
  """`workdir`'s checkpoints folder; a CheckpointError where it has none (a workdir never trained or
  mistyped), checked before anything would create it (Orbax's manager, the compile cache beside it)."""
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  if not directory.is_dir():
    raise CheckpointError(f'no checkpoint in {directory}: train this workdir first')
  return directory


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                          target: Callable[[], Any], same_split: bool = False) -> tuple[int, Any]:
  """(step, state) of the checkpoint `config.eval.checkpoint` names in `workdir`, refused unless it was
  trained with `config.model`'s network (and, with `same_split`, on `config`'s split of the cases:
  `check_same_split`). `target()` gives the state to restore into (its structure and shardings); it is
  called only once those checks have passed."""
  directory = trained_directory(workdir)
  with _unreadable_as_one_line(directory):  # the manager reads every step's metrics
    mngr = manager(workdir, config.checkpoint.keep)
  try:
    step = _requested_step(mngr, config.eval.checkpoint)
    parallel.check_same_step(directory.parent, step, f'restoring eval.checkpoint={config.eval.checkpoint!r},')
    with _unreadable_as_one_line(directory / str(step)):
      saved = saved_config(mngr, step)
    check_same_model(saved, config.model, directory / str(step), instead='another workdir')
    if same_split:
      check_same_split(saved, config, directory / str(step))
    abstract = target()
    with _unreadable_as_one_line(directory / str(step)):
      state = restore(mngr, step, abstract)
  finally:
    mngr.close()
  return step, state


def unreadable_to_resume(mngr: ocp.CheckpointManager, step: int) -> contextlib.AbstractContextManager:
  """Reads of the checkpoint a run resumes from (`step`), whose failure is one line with the way out: its
  removal resumes the run from the step before (a file cut short by a full disk or a copy)."""
  earlier = [s for s in mngr.all_steps() if s < step]
  way_out = f'; remove it to resume from step {max(earlier)}' if earlier else '; remove it to start afresh'
  return _unreadable_as_one_line(mngr.directory / str(step), way_out)


def _closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _drop_closed_loop_errors() -> None:
  """Silences the reads or writes that a failed orbax restore or save leaves in flight: each one that
  completes later calls back into the event loop orbax has closed, and Python would print a 'RuntimeError:
  Event loop is closed' traceback for each (hundreds) around the one-line error, as an unraisable error or,
  from tensorstore's threads, through sys.excepthook; and asyncio would log the failed reads' errors that
  nobody awaits. Other errors still reach the hooks."""
  previous, previous_excepthook = sys.unraisablehook, sys.excepthook
  if getattr(previous, 'drops_closed_loop_errors', False):
    return

  def hook(unraisable) -> None:
    if not _closed_loop(unraisable.exc_value):
      previous(unraisable)

  def excepthook(kind, error, traceback) -> None:
    if not _closed_loop(error):
      previous_excepthook(kind, error, traceback)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook, sys.excepthook = hook, excepthook
  # The reads' own errors, which orbax no longer awaits, asyncio logs as it collects them.
  logging.getLogger('asyncio').addFilter(
      lambda record: not record.getMessage().startswith('Future exception was never retrieved'))


@contextlib.contextmanager
def _unreadable_as_one_line(path: pathlib.Path, way_out: str = '') -> Iterator[None]:
  """Turns what orbax and tensorstore raise on missing, truncated or foreign checkpoint files into one line
  that names `path` (and ends with `way_out`)."""
  _drop_closed_loop_errors()  # before: the reads a failed one leaves in flight end as orbax gives up
  try:
    yield
  except Exception as error:  # tensorstore reports a truncated array file as a bare Exception
    # Only orbax reads run in this block, so whatever fails here is the checkpoint's files, bar the memory.
    e = error
    for _ in range(8):  # orbax wraps tensorstore's error, which says what is wrong, in a generic one
      e = e.__cause__ or e
    reason = one_line(e)
    if 'RESOURCE_EXHAUSTED' in reason:  # out of memory restoring it: the files may well be whole
      raise
    if not path.exists():  # deleted under the read: not corrupt
      raise CheckpointError(f'{path}: removed while it was read (by the training running in this workdir, '
                            'which keeps its newest and best checkpoints only); run again to read one it '
                            'keeps') from None
    reason = reason if len(reason) <= 280 else reason[:280] + '...'  # tensorstore's run to pages
    if any(text in reason for text in ('Structure mismatch', 'tree structures do not match',
                                       'not compatible with the stored shape')):
      # Whole files of a training state laid out otherwise (the model is checked before): every checkpoint
      # of the workdir is so, and removing this one would not help.
      raise CheckpointError(f'{path}: a training state laid out otherwise than this version of easunet_jax '
                            f'lays it out ({reason}); read it with the version that wrote it, or start '
                            'another workdir') from None
    raise CheckpointError(f'{path}: unreadable or corrupt checkpoint ({reason}){way_out}') from None
