"""Segmentation networks; `build_model(config)` makes the one `config.model.name` names."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from easunet_jax.models.eas_unet import EASUNet

MODELS = {'eas_unet': EASUNet}


def build_model(model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The network of `model_cfg` (the config's `model` group), in training mode."""
  if model_cfg.name not in MODELS:
    raise ValueError(f'model.name must be one of {sorted(MODELS)}, got {model_cfg.name!r}')
  if model_cfg.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {model_cfg.dtype!r}")
  return MODELS[model_cfg.name](
      features=tuple(model_cfg.features), num_classes=model_cfg.num_classes,
      aspp_rates=tuple(model_cfg.aspp_rates), depthwise_impl=model_cfg.depthwise_impl,
      dtype=jnp.dtype(model_cfg.dtype), rngs=rngs)
