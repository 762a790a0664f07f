"""CPU smoke-test size: a small phantom, a narrow three-level EAS U-Net, a handful of steps.

Three levels instead of five: every part of the network (separable blocks, EAS with ECA, fused side
outputs) is still there, and a train step compiles in half the time, which is most of the test suite's.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = 'tiny'
  c.data.phantom_num = 4
  c.data.phantom_shape = (8, 32, 32)
  c.data.phantom_spacing = (3.5, 2.0, 2.0)
  c.data.augment = False
  c.model.features = (4, 8, 16)  # stride 4
  c.loss.side_weights = (0.5, 0.25)  # one per decoder level
  c.train.batch_size = 4
  c.train.num_steps = 6
  c.train.eval_every_steps = 3
  c.checkpoint.every_steps = 3
  c.log.every_steps = 1
  c.eval.batch_size = 4
  return c
