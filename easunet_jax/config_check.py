"""Start-up checks of a run's config, before anything is compiled: a field the run cannot use ends it with
one line that names the field and what was expected (ConfigError; main.py exits with code 2)."""

import collections
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import nnx

from configs import default, eas
from easunet_jax import models, pretrained, steps
from easunet_jax.data import pipeline, volumes
from easunet_jax.errors import CheckpointError, ConfigError, exit_with, one_line

# Slices of this many strides trace the step for real data: their slice store pads slices to a multiple.
_TRACE_STRIDES = 16
_POSITIVE = ('train.batch_size', 'train.eval_every_steps', 'eval.batch_size', 'predict.batch_size',
             'checkpoint.every_steps', 'checkpoint.keep', 'log.every_steps', 'data.phantom_num')
_NON_NEGATIVE = ('train.num_steps', 'train.num_epochs', 'data.workers', 'predict.min_component_mm3',
                 'predict.slice_sigma_mm', 'optim.weight_decay', 'data.phantom_elastic_mm',
                 'data.phantom_effusion_mm', 'eval.num_figure_slices')
NAN_POLICIES = ('stop', 'skip')
# The folder that holds this project's configs/: a checkout's root, or an installed easunet_jax's
# site-packages.
_PROJECT = pathlib.Path(default.__file__).resolve().parents[1]


def project_file(spec: str) -> str:
  """`spec`, a config or sweep file (`path[:arg]`), read in this project's folder where its relative path
  names no file in the working directory: `configs/eas.py` is the project's config from any folder, also
  where easunet_jax is installed without its checkout. A file of the working directory's comes first."""
  path, colon, arg = spec.partition(':')
  if path and not os.path.isabs(path) and not os.path.exists(path) and (_PROJECT / path).is_file():
    return f'{_PROJECT / path}{colon}{arg}'
  return spec


def project_config(argv: Sequence[str]) -> list[str]:
  """`argv` with its --config=<file> (or --config <file>) read by `project_file`."""
  return [f'--config={project_file(a.removeprefix("--config="))}' if a.startswith('--config=') else
          project_file(a) if i and argv[i - 1] == '--config' else a for i, a in enumerate(argv)]


_HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')  # absl's, each of which prints and exits


def _end_of_help() -> NoReturn:
  """Exits 0 once absl has printed the help; quietly where its reader stopped reading (`| head`), whose
  closed pipe would fail this flush and Python's own at exit."""
  try:
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  raise SystemExit(0) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for a program with a --config flag (main.py, `python -m easunet_jax.models`), where a
  bad flag, --config.<field> override or stray argument ends the run with one line and ConfigError's exit
  code (absl prints two lines, and a traceback for an unknown config field); --help exits 0, as nnU-Net's."""
  verbose = '--verbose' in argv or '--verbose=true' in argv
  helped = any(arg.lstrip('-').partition('=')[0] in _HELP_FLAGS for arg in argv[1:] if arg.startswith('-'))
  reference = default.get_config()
  argv = project_config(argv)
  try:
    check_given_once(argv, reference)
    argv = flags.FLAGS(argv)
    if flags.FLAGS.config is not None:
      # config_flags reports a config file that failed to load only when it is read; check_complete then
      # names what a file that loaded returned, if no ConfigDict.
      getattr(flags.FLAGS.config, 'keys', None)
    if flags.FLAGS['config'].present:
      check_complete(flags.FLAGS.config, reference)
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}: every argument is a flag, --<name>=<value>')
    return argv
  except ConfigError as e:
    exit_with(e)
  except SystemExit as e:  # absl's --help and its kin print the flags and exit 1: asked for, no failure
    if helped and e.code == 1:
      _end_of_help()
    raise
  except OSError as e:  # the config file: only the last line of the chained report says why
    if helped and isinstance(e, BrokenPipeError):
      _end_of_help()
    if verbose:
      raise
    exit_with(ConfigError(f'--config: {str(e).strip().splitlines()[-1]}'))
  except flags.UnrecognizedFlagError as e:
    if verbose:
      raise
    if not e.flagname.startswith('config.'):  # absl's message names the flag and the ones it is close to
      exit_with(ConfigError(str(e)))
    # absl knows no --config.<field> without --config: 'Unknown command line flag' would not say why. The
    # flags absl knows are set all the same: a model file of the user's own needs its training's config.
    weights = flags.FLAGS['weights'].value if 'weights' in flags.FLAGS else None
    if weights and pathlib.Path(weights).resolve() != pretrained.SHIPPED.resolve():
      exit_with(ConfigError(f'--{e.flagname}: a config field, set only beside --config=<file> (beside '
                            f'--weights={weights}: the config file it was trained with)'))
    exit_with(ConfigError(f'--{e.flagname}: a config field, set only beside --config=<file> (to predict '
                          f'with the shipped model: {eas.SHIPPED_FLAGS})'))
  except OVERRIDE_ERRORS as e:
    if verbose or (line := override_error(e, argv, reference)) is None:
      raise
    exit_with(ConfigError(line))


def check_given_once(argv: Sequence[str], reference: ml_collections.ConfigDict) -> None:
  """Refuses a tuple field (`reference`'s) given twice among `argv`'s --config.<field> overrides: absl would
  join the two tuples into one (a network of both widths), where a scalar field's last value wins."""
  given = collections.defaultdict(list)
  for arg in argv:
    if arg.startswith('--config.'):
      name, _, value = arg.removeprefix('--config.').partition('=')
      given[name].append(value)
  tuples = {name for name, value in leaves(reference).items() if isinstance(value, tuple | list)}
  for name, values in given.items():
    if name in tuples and len(values) > 1:
      raise ConfigError(f'--config.{name} is given {len(values)} times ({", then ".join(values)}), and absl '
                        'would join them into one tuple; give it once')


# What absl and ml_collections raise parsing --config flags: `override_error` tells which are the user's.
OVERRIDE_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, IndexError)


def override_error(error: Exception, argv: Sequence[str], reference: ml_collections.ConfigDict) -> str | None:
  """One line for `error` (one of `OVERRIDE_ERRORS`), raised while absl parsed `argv`'s --config flags (a
  bad value, an unknown field or an element of a sequence such as features.0, a config file that raised):
  the unknown field with the fields its group has (`reference`'s), else the error's own last line. None for
  an error of a config file's own code, which keeps its traceback."""
  # config_flags loads --config's file as the module config_config and calls its get_config.
  if isinstance(error, AttributeError) and (error.name, getattr(error.obj, '__name__', '')) == (
      'get_config', 'config_config'):
    return ("--config: the file has no get_config(): start from configs/default.py's get_config() and set "
            'fields on it')
  unknown = unknown_overrides(argv, reference)
  lacked = None if unknown else lacked_override(error, argv)
  if not (isinstance(error, flags.Error | TypeError) or unknown or lacked):
    return None
  # A config file that raised: its traceback is in the message, and the last line says why.
  before, traceback, _ = str(error).partition('Traceback (most recent call last):')
  message = before + str(error).strip().splitlines()[-1] if traceback else str(error)
  if lacked:
    return (f'--config.{lacked}: its config file lacks the field, which the default config has: a file of an '
            "older version, or a group assigned whole? Start from configs/default.py's get_config() and set "
            'fields on it')
  if not unknown:
    return ' '.join(message.split())
  return f'--config.{_unknown_field(unknown[0], leaves(reference))}'


def lacked_override(error: Exception, argv: Sequence[str]) -> str | None:
  """The --config.<field> of `argv` that `error` (absl's, as it set the overrides) says the config file
  lacks: ml_collections raises a bare KeyError of the field's last name."""
  if not isinstance(error, AttributeError | KeyError):
    return None
  key = str(error).strip('\'"')
  overrides = [arg.removeprefix('--config.').partition('=')[0] for arg in argv if arg.startswith('--config.')]
  return next((name for name in overrides if name.rpartition('.')[2] == key), None)


def unknown_overrides(argv: Sequence[str], reference: ml_collections.ConfigDict) -> list[str]:
  """The fields of `argv`'s --config.<field> overrides that `reference` does not have."""
  known = leaves(reference)
  overrides = [arg.removeprefix('--config.').partition('=')[0] for arg in argv if arg.startswith('--config.')]
  return [name for name in overrides if name not in known]


def _unknown_field(name: str, known: dict[str, Any]) -> str:
  """Why `name` is not one of the fields `known` ({'group.field': default}), with the fields to use."""
  whole = next((field for field in known if name.startswith((f'{field}.', f'{field}['))), None)
  if whole:  # an element of a sequence (features.0, features[0]): absl sets a field only as a whole
    return f'{name}: {whole} is set whole, e.g. --config.{whole}="{known[whole]}"'
  members = [field for field in known if field.startswith(f'{name}.')]
  if members:
    return f'{name}: a group of fields, set one of them ({", ".join(members)})'
  group = name.rpartition('.')[0]
  # A misspelt group has no fields of its own, and a field at the top may be a group's name misspelt: then
  # the names at the top, groups included.
  fields = (group and [field for field in known if field.rpartition('.')[0] == group]) or list(
      dict.fromkeys(field.partition('.')[0] for field in known))
  return f'{name}: no such config field (expected one of {", ".join(fields)})'


def leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'group.field': value} of every field that is not itself a group."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(leaves(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_complete(config: Any, reference: ml_collections.ConfigDict, given_as: str = '--config') -> None:
  """A config file's get_config() (the file of the flag `given_as`) gave a ConfigDict with every field of
  the default config: a copy of an older version's file, or a group assigned whole, lacks some, which would
  fail deep in a run."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{given_as}: its get_config() returned {type(config).__name__}, expected an '
                      "ml_collections.ConfigDict: start from configs/default.py's get_config() and set "
                      'fields on it')
  given = leaves(config)
  if missing := [name for name in leaves(reference) if name not in given]:
    raise ConfigError(f'{given_as}: its config lacks {len(missing)} field(s) ({", ".join(missing[:4])}'
                      f'{", ..." if len(missing) > 4 else ""}): a file of an older version, or a group '
                      "assigned whole? Start from configs/default.py's get_config() and set fields on it")


def check_config(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, mode: str) -> None:
  """Raises ConfigError for the first bad field of `config`: unknown to `reference` (the default config),
  of another type than there, or with a value that `mode` cannot run with."""
  given, expected = leaves(config), leaves(reference)
  for name, value in given.items():
    if name not in expected:
      raise ConfigError(_unknown_field(name, expected))
    if not _has_kind(value, expected[name]):
      raise ConfigError(f'{name}: expected {_kind(expected[name])}, got {value!r}')
  _check_values(config, mode)


def _kind(default: Any) -> str:
  if isinstance(default, bool):
    return 'True or False'
  if isinstance(default, int):
    return 'an integer'
  if isinstance(default, float):
    return 'a number'
  if isinstance(default, str):
    return 'a string'
  if isinstance(default, tuple | list):
    return f'a sequence like {tuple(default)}'
  return type(default).__name__


def _has_kind(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, int | float) and not isinstance(value, bool)
  if isinstance(default, tuple | list):
    return isinstance(value, tuple | list) and (not default or all(_has_kind(v, default[0]) for v in value))
  return isinstance(value, type(default))


def _check_values(config: ml_collections.ConfigDict, mode: str) -> None:
  fields = leaves(config)
  # NaN passes every comparison below (all are False), and no field means anything at infinity.
  for name, value in fields.items():
    numbers = value if isinstance(value, tuple | list) else (value,)
    if not all(math.isfinite(v) for v in numbers if isinstance(v, float)):
      raise ConfigError(f'{name}: expected finite numbers, got {value!r}')
  if not 0 <= config.seed < 2 ** 32:
    raise ConfigError(f'seed: expected an integer from 0 to 2**32 - 1, got {config.seed}')
  # runs/<name> is the default workdir: '', '.' or '..' would make it runs/ itself or the folder above.
  name = pathlib.PurePath(config.name)
  if not name.parts or name.is_absolute() or '..' in name.parts:
    raise ConfigError(f'name: expected a folder name under runs/ (the default --workdir), got '
                      f'{config.name!r}')
  for name in _POSITIVE:
    if fields[name] <= 0:
      raise ConfigError(f'{name}: expected a positive integer, got {fields[name]}')
  for name in _NON_NEGATIVE:
    if fields[name] < 0:
      raise ConfigError(f'{name}: expected a non-negative number, got {fields[name]}')
  for name in ('predict.zoom', 'predict.background_weight', 'optim.lr', 'loss.dice_eps'):
    if fields[name] <= 0:
      raise ConfigError(f'{name}: expected a positive number, got {fields[name]}')
  if not 0 <= config.optim.momentum < 1:
    raise ConfigError(f'optim.momentum: expected a number from 0 to below 1, got {config.optim.momentum}')
  if not 0 <= config.predict.min_component_fraction < 1:
    raise ConfigError(f'predict.min_component_fraction: expected a fraction from 0 to below 1 (1 would drop '
                      f'every plate), got {config.predict.min_component_fraction}')
  if not 0 <= config.data.augment_rotate_deg <= 180:
    raise ConfigError(f'data.augment_rotate_deg: expected degrees from 0 to 180 (rotations within +-this), '
                      f'got {config.data.augment_rotate_deg}')
  if not 0 <= config.data.phantom_oa_fraction <= 1:
    raise ConfigError(f'data.phantom_oa_fraction: expected a fraction from 0 to 1, got '
                      f'{config.data.phantom_oa_fraction}')
  if not config.train.num_steps and not config.train.num_epochs:
    raise ConfigError('train.num_steps and train.num_epochs: expected one of them positive, got both 0')
  if config.train.nan_policy not in NAN_POLICIES:
    raise ConfigError(f'train.nan_policy: expected one of {NAN_POLICIES}, got {config.train.nan_policy!r}')
  if len(config.model.features) < 2 or min(config.model.features) <= 0:
    raise ConfigError(f'model.features: expected positive integers, one width per resolution level, two or '
                      f'more, got {tuple(config.model.features)}')
  if min(config.model.aspp_rates, default=1) <= 0:
    raise ConfigError(f'model.aspp_rates: expected positive integers (the atrous branches\' dilations), got '
                      f'{tuple(config.model.aspp_rates)}')
  if min(config.loss.side_weights, default=0) < 0:
    raise ConfigError(f'loss.side_weights: expected non-negative numbers, got '
                      f'{tuple(config.loss.side_weights)}')
  spacing = tuple(config.predict.spacing)
  if len(spacing) != 2 or not (all(s > 0 for s in spacing) or not any(spacing)):
    raise ConfigError(f"predict.spacing: expected the in-plane pixel in mm the model was trained at, two "
                      f"positive numbers, or (0.0, 0.0) for the training slice store's, got {spacing}")
  if str(config.eval.checkpoint) not in ('best', 'latest') and not str(config.eval.checkpoint).isdigit():
    raise ConfigError(f"eval.checkpoint: expected 'best', 'latest' or a step number, got "
                      f'{config.eval.checkpoint!r}')
  if mode == 'train' and config.model.name == 'eas_unet' and config.model.eas and config.train.batch_size < 2:
    # The EAS image-pooling branch's BatchNorm sees one value per sample: over a batch of one its output
    # is 0 and the branch learns nothing (PyTorch refuses such a batch).
    raise ConfigError('train.batch_size: expected at least 2 for the EAS module (its image-pooling branch '
                      'normalises over the batch), got 1')
  if mode == 'train' and config.train.batch_size % jax.device_count():
    raise ConfigError(f'train.batch_size: expected a multiple of the device count {jax.device_count()}, '
                      f'got {config.train.batch_size}')
  if config.model.num_classes != 3:  # validation, evaluation, predict and the reports score FC and TC
    raise ConfigError(f'model.num_classes: expected 3 (background, femoral and tibial cartilage), got '
                      f'{config.model.num_classes}')
  data = config.data
  classes = config.model.num_classes
  if any(len(pair) != 2 or not 0 <= pair[0] <= 255 or not 0 <= pair[1] < classes for pair in data.label_map
         ) or not any(pair[1] for pair in data.label_map):
    raise ConfigError(f'data.label_map: expected (source label, training class) pairs, labels 0-255 and '
                      f'classes 0-{classes - 1} (model.num_classes {classes}), one class at least not 0, got '
                      f'{tuple(map(tuple, data.label_map))}')
  sources = collections.Counter(pair[0] for pair in data.label_map)
  if twice := sorted(source for source, n in sources.items() if n > 1):
    raise ConfigError(f'data.label_map: source label {twice[0]} given {sources[twice[0]]} pairs, expected '
                      f'one (each label maps to one class), got {tuple(map(tuple, data.label_map))}')
  # Predict and export read no data set: a model file's or a copied workdir's paths are the training
  # machine's.
  reads_data = mode not in ('predict', 'export')
  if reads_data and data.root and not pathlib.Path(data.root).is_dir():
    raise ConfigError(f'data.root: expected a dataset directory (images/ + labels/ or imagesTr/ + labelsTr/) '
                      f"or '' for the built-in phantom, got {data.root!r}, which is not a directory")
  for name in ('data.cache_dir', 'data.phantom_dir'):
    if reads_data and fields[name] and (file := file_in_the_way(fields[name])):
      raise ConfigError(f"{name}: expected a folder (made if missing) or '', got {fields[name]!r}: {file}")
  if reads_data and data.split_file and not pathlib.Path(data.split_file).is_file():
    raise ConfigError(f"data.split_file: expected a JSON file or '', got {data.split_file!r}, which is not a "
                      'file')
  multiple = models.stride(config.model.features)
  image_HW = (_TRACE_STRIDES * multiple,) * 2
  if not data.root:
    shape = tuple(data.phantom_shape)
    if len(shape) != 3 or min(shape) <= 0 or shape[1] % multiple or shape[2] % multiple:
      raise ConfigError(f'data.phantom_shape: expected 3 positive sizes, the last two (the sagittal slice) '
                        f'multiples of the network stride {multiple}, got {shape}')
    if len(data.phantom_spacing) != 3 or min(data.phantom_spacing) <= 0:
      raise ConfigError(f'data.phantom_spacing: expected 3 positive voxel sizes in mm, got '
                        f'{tuple(data.phantom_spacing)}')
    if data.phantom_oa_fraction and data.phantom_anatomy != 'reference':
      raise ConfigError(f"data.phantom_oa_fraction: osteoarthritic knees are drawn with data.phantom_anatomy="
                        f"'reference', got {data.phantom_anatomy!r}")
    if data.phantom_effusion_mm and data.phantom_anatomy != 'reference':
      raise ConfigError(f"data.phantom_effusion_mm: large effusions are drawn with data.phantom_anatomy="
                        f"'reference', got {data.phantom_anatomy!r}")
    if (data.phantom_elastic_mm != default.get_config().data.phantom_elastic_mm
        and data.phantom_anatomy != 'reference'):
      raise ConfigError(f'data.phantom_elastic_mm: knees are warped from the real one with '
                        f"data.phantom_anatomy='reference', got {data.phantom_anatomy!r}, whose shapes it "
                        'would leave as they are')
    image_HW = shape[1:]
  if mode != 'preprocess':
    try:
      trace_model_loss(config, image_HW)
    except (ValueError, TypeError) as e:  # jax's shape errors, e.g. of widths the network cannot join
      raise ConfigError(one_line(e)) from e


def check_export_output(output: str | None) -> None:
  """--mode=export's --output: a model file (.npz) in a folder that can be made, written over no file but a
  model file (never a scan or a label map given by another mode's habit)."""
  if not output or os.path.isdir(output) or output.endswith(('/', os.sep)):
    raise ConfigError('--mode=export needs --output, the model file to write, e.g. model.npz' +
                      (f'; {output} names a folder' if output else ''))
  if file := file_in_the_way(os.path.dirname(os.path.abspath(output))):
    raise ConfigError(f'--output={output}: {file}; expected a folder (made if missing)')
  if not output.endswith('.npz'):
    raise ConfigError(f'--output={output}: expected a model file name ending in .npz')
  if os.path.isfile(output):
    try:
      pretrained.read_meta(output)
    except CheckpointError:
      raise ConfigError(f'--output={output}: a file that is not a model file of easunet_jax, which export '
                        'would overwrite; name another') from None


def file_in_the_way(folder: str | pathlib.Path) -> str | None:
  """What stops `folder` from being made, as '<path> is a file' or '<path> is a broken link (to ...)': the
  nearest path at or above it that is there but not a folder; None where nothing is in the way."""
  path = os.path.abspath(folder)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  if why := volumes.broken_link(path):
    return f'{path} is {why}'
  return None if os.path.isdir(path) else f'{path} is a file'


# What a run keeps in its workdir, by kind. Something else of that name fails late (a file where the
# checkpoints go, at the first save after compiling), with a traceback (a folder where train.log goes), or
# is lost: a slice store being rebuilt replaces what stands at its path.
_WORKDIR_FOLDERS = ('checkpoints', 'eval', 'slices', 'tensorboard')
_WORKDIR_FILES = ('metrics.jsonl', 'runs.jsonl', 'train.log', pipeline.TRAINED_ON)


def workdir_part_in_the_way(workdir: str | pathlib.Path, cache_dir: str) -> str | None:
  """'<path> is a file', '<path> is a folder' or '<path> is a broken link (to ...)' for the first of the
  workdir's own folders and files that is there as another kind (the slice store's only where `cache_dir`,
  data.cache_dir, puts it in the workdir); None where all are as a run keeps them."""
  for name in _WORKDIR_FOLDERS:
    if (name != 'slices' or not cache_dir) and (why := file_in_the_way(os.path.join(workdir, name))):
      return why
  for name in _WORKDIR_FILES:
    if os.path.isdir(path := os.path.join(workdir, name)):
      return f'{path} is a folder'
  return None


def trace_model_loss(config: ml_collections.ConfigDict, image_HW: tuple[int, int]) -> None:
  """Builds the model and its loss on shapes alone, compiling nothing (a few times faster than tracing the
  whole step): raises at start-up what the model, the loss or the optimiser would raise for `config` at
  the first step (widths, switches, side outputs)."""
  steps.make_optimizer(config.optim, num_steps=1)
  model_cfg = config.model.copy_and_resolve_references()
  if model_cfg.depthwise_impl == 'auto':  # the same shapes as the native kernel, which only training builds
    model_cfg.depthwise_impl = 'shift'
  graphdef, params = nnx.split(models.abstract_model(model_cfg))
  batch = {'image': jax.ShapeDtypeStruct((1, *image_HW, 1), jnp.float32),
           'label': jax.ShapeDtypeStruct((1, *image_HW), jnp.int32)}
  jax.eval_shape(lambda p, b: steps.model_loss(nnx.merge(graphdef, p), b, config.loss), params, batch)
