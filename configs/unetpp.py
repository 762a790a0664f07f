"""The paper's baseline U-Net++ (Zhou 2018), without deep supervision (its default): configs/eas.py with
only the model changed.

`--config=configs/unetpp.py:demo` is eas.py's CPU demo size with this model.
"""

import ml_collections

from configs import eas


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = eas.get_config(arg)
  c.name = c.name.replace('eas', 'unetpp', 1)
  c.model.name = 'unetpp'
  c.model.deep_supervision = False
  return c
