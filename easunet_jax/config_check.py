"""Start-up checks of a run's config, before anything is compiled: a field the run cannot use ends it with
one line that names the field and what was expected (ConfigError; main.py exits with code 2)."""

import pathlib
from typing import Any

import jax
import ml_collections

from easunet_jax import train

_SLICE_MULTIPLE = 16  # the networks halve a slice four times
# Any multiple of 16 serves to trace the step for real data: their slice store pads slices to one.
_TRACE_HW = (256, 256)
_POSITIVE = ('train.batch_size', 'train.eval_every_steps', 'eval.batch_size', 'predict.batch_size',
             'checkpoint.every_steps', 'checkpoint.keep', 'log.every_steps', 'data.phantom_num')
_NON_NEGATIVE = ('train.num_steps', 'train.num_epochs', 'data.workers')
NAN_POLICIES = ('stop', 'skip')


class ConfigError(ValueError):
  """A config field with a value the run cannot use."""


def leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """{'group.field': value} of every field that is not itself a group."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(leaves(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_config(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, mode: str) -> None:
  """Raises ConfigError for the first bad field of `config`: unknown to `reference` (the default config),
  of another type than there, or with a value that `mode` cannot run with."""
  given, expected = leaves(config), leaves(reference)
  for name, value in given.items():
    if name not in expected:
      group = name.rpartition('.')[0]
      known = sorted(k for k in expected if k.rpartition('.')[0] == group)
      raise ConfigError(f'{name}: no such config field (expected one of {", ".join(known)})')
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
  for name in _POSITIVE:
    if fields[name] <= 0:
      raise ConfigError(f'{name}: expected a positive integer, got {fields[name]}')
  for name in _NON_NEGATIVE:
    if fields[name] < 0:
      raise ConfigError(f'{name}: expected a non-negative integer, got {fields[name]}')
  if not config.train.num_steps and not config.train.num_epochs:
    raise ConfigError('train.num_steps and train.num_epochs: expected one of them positive, got both 0')
  if config.train.nan_policy not in NAN_POLICIES:
    raise ConfigError(f'train.nan_policy: expected one of {NAN_POLICIES}, got {config.train.nan_policy!r}')
  if not config.model.features or min(config.model.features) <= 0:
    raise ConfigError(f'model.features: expected positive integers, got {tuple(config.model.features)}')
  if mode == 'train' and config.train.batch_size % jax.device_count():
    raise ConfigError(f'train.batch_size: expected a multiple of the device count {jax.device_count()}, '
                      f'got {config.train.batch_size}')
  data = config.data
  if data.root and not pathlib.Path(data.root).is_dir():
    raise ConfigError(f'data.root: expected a dataset directory (images/ + labels/ or imagesTr/ + labelsTr/) '
                      f"or '' for the built-in phantom, got {data.root!r}, which is not a directory")
  if data.split_file and not pathlib.Path(data.split_file).is_file():
    raise ConfigError(f"data.split_file: expected a JSON file or '', got {data.split_file!r}, which is not a file")
  image_HW = _TRACE_HW
  if not data.root:
    shape = tuple(data.phantom_shape)
    if len(shape) != 3 or min(shape) <= 0 or shape[1] % _SLICE_MULTIPLE or shape[2] % _SLICE_MULTIPLE:
      raise ConfigError(f'data.phantom_shape: expected 3 positive sizes, the last two (the sagittal slice) '
                        f'multiples of {_SLICE_MULTIPLE}, got {shape}')
    image_HW = shape[1:]
  if mode != 'preprocess':
    try:
      train.trace_model_loss(config, image_HW)
    except (ValueError, TypeError) as e:
      raise ConfigError(' '.join(str(e).split())) from e
