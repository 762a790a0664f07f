"""The paper's baseline Attention U-Net (Oktay 2018): configs/eas.py with only the model changed.

`--config=configs/attention_unet.py:demo` is eas.py's CPU demo size with this model.
"""

import ml_collections

from configs import eas


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = eas.get_config(arg)
  c.name = c.name.replace('eas', 'attention_unet', 1)
  c.model.name = 'attention_unet'
  return c
