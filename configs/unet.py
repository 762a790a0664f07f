"""The paper's baseline U-Net (Ronneberger 2015, with BatchNorm): configs/eas.py with only the model changed.

`--config=configs/unet.py:demo` is eas.py's CPU demo size with this model.
"""

import ml_collections

from configs import eas


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = eas.get_config(arg)
  c.name = c.name.replace('eas', 'unet', 1)
  c.model.name = 'unet'
  return c
