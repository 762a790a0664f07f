"""Segmentation networks; `build_model(config.model)` makes the one `model.name` names, `abstract_model`
its shapes alone, and `stride(model.features)` is the multiple that their slice sizes must be."""

import functools

import jax.numpy as jnp
import ml_collections
from flax import nnx

from easunet_jax.errors import ConfigError
from easunet_jax.models.attention_unet import AttentionUNet
from easunet_jax.models.eas_unet import EASUNet
from easunet_jax.models.unet import UNet, stride
from easunet_jax.models.unetpp import UNetPlusPlus

__all__ = ['EAS_SWITCHES', 'MODELS', 'abstract_model', 'build_model', 'stride']

MODELS = {'eas_unet': EASUNet, 'unet': UNet, 'unetpp': UNetPlusPlus, 'attention_unet': AttentionUNet}

# EAS U-Net's ablation switches: each field's allowed values, the paper's network's first.
EAS_SWITCHES = {'block': ('separable', 'standard'), 'eca': (True, False), 'eas': (True, False),
                'fusion': ('concat', 'add')}


def _check_switches(model_cfg: ml_collections.ConfigDict) -> None:
  """ConfigError for a bad switch value, or an EAS U-Net switch moved on another network."""
  switches = dict(EAS_SWITCHES, deep_supervision=(True, False))
  for field, allowed in switches.items():
    value = model_cfg[field]
    # `1 in (True, False)` holds in Python: booleans are checked by type.
    if (isinstance(allowed[0], bool) and not isinstance(value, bool)) or value not in allowed:
      raise ConfigError(f'model.{field} must be one of {allowed}, got {value!r}')
  if model_cfg.name != 'eas_unet':
    for field, allowed in EAS_SWITCHES.items():
      if model_cfg[field] != allowed[0]:
        raise ConfigError(f'model.{field} is an EAS U-Net ablation; model.name {model_cfg.name!r} '
                          f'needs model.{field} = {allowed[0]!r}')
  elif model_cfg.fusion == 'add' and not model_cfg.deep_supervision:
    raise ConfigError("model.fusion = 'add' fuses side outputs: it needs model.deep_supervision = True")


def _check(model_cfg: ml_collections.ConfigDict) -> None:
  """ConfigError for a network, dtype or switch value the models do not have."""
  if model_cfg.name not in MODELS:
    raise ConfigError(f'model.name must be one of {sorted(MODELS)}, got {model_cfg.name!r}')
  if model_cfg.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {model_cfg.dtype!r}")
  _check_switches(model_cfg)


def build_model(model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The network of `model_cfg` (the config's `model` group), in training mode."""
  _check(model_cfg)
  common = {'features': tuple(model_cfg.features), 'num_classes': model_cfg.num_classes,
            'dtype': jnp.dtype(model_cfg.dtype), 'rngs': rngs}
  if model_cfg.name == 'eas_unet':
    return EASUNet(aspp_rates=tuple(model_cfg.aspp_rates), depthwise_impl=model_cfg.depthwise_impl,
                   deep_supervision=model_cfg.deep_supervision,
                   **{field: model_cfg[field] for field in EAS_SWITCHES}, **common)
  if model_cfg.name == 'unetpp':
    return UNetPlusPlus(deep_supervision=model_cfg.deep_supervision, **common)
  return MODELS[model_cfg.name](**common)


@functools.cache
def _abstract_split(model_cfg: ml_collections.FrozenConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0))))


def abstract_model(model_cfg: ml_collections.ConfigDict) -> nnx.Module:
  """The network of `model_cfg` with shapes but no values, in training mode: a new module each call, from
  one trace per network and process. Tracing a build takes seconds for the paper's network (flax asks each
  traced variable update for its sharding, and JAX's error message for a tracer walks the whole program),
  and the start-up check, the graphdefs and a model file's loader each need one."""
  # Checked before the cache: eca=1 equals and hashes as eca=True, whose trace it would find.
  _check(model_cfg)
  return nnx.merge(*_abstract_split(ml_collections.FrozenConfigDict(model_cfg)))
