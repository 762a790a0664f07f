"""Segmentation networks; `build_model(config)` makes the one `config.model.name` names."""

import jax.numpy as jnp
import ml_collections
from flax import nnx

from easunet_jax.models.eas_unet import EASUNet
from easunet_jax.models.unet import UNet

MODELS = {'eas_unet': EASUNet, 'unet': UNet}


def build_model(model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The network of `model_cfg` (the config's `model` group), in training mode."""
  if model_cfg.name not in MODELS:
    raise ValueError(f'model.name must be one of {sorted(MODELS)}, got {model_cfg.name!r}')
  if model_cfg.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {model_cfg.dtype!r}")
  common = {'features': tuple(model_cfg.features), 'num_classes': model_cfg.num_classes,
            'dtype': jnp.dtype(model_cfg.dtype), 'rngs': rngs}
  if model_cfg.name == 'eas_unet':
    return EASUNet(aspp_rates=tuple(model_cfg.aspp_rates), depthwise_impl=model_cfg.depthwise_impl,
                   **common)
  return MODELS[model_cfg.name](**common)
