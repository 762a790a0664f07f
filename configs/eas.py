"""EAS U-Net with the paper's settings: 384 x 384 sagittal slices, batch 16, 50 epochs, SGD 0.01 / 0.9 / 1e-4.

`--config=configs/eas.py:demo` is the same model family shrunk to train on a 2-core CPU in minutes:
a 64 mm field of view on the joint at 0.5 mm (128 x 128 slices), narrower widths, fewer steps.
`--config=configs/eas.py:knee` is the recipe of the shipped model: real-anatomy phantoms, synthesised
contrasts.
"""

import pathlib

import ml_collections

from configs import default

# The model `:knee` trains, shipped with the package, and the flags that predict with it from any folder.
SHIPPED = pathlib.Path(__file__).resolve().parents[1] / 'easunet_jax' / 'weights' / 'eas_knee.npz'
SHIPPED_FLAGS = f'--config={pathlib.Path(__file__).resolve()}:knee --weights={SHIPPED}'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = 'eas'
  c.model.name = 'eas_unet'
  if arg == 'demo':
    c.name = 'eas_demo'
    c.data.phantom_num = 12
    c.data.phantom_shape = (32, 128, 128)
    c.data.phantom_spacing = (3.5, 0.5, 0.5)
    c.model.features = (16, 32, 64, 128, 256)
    c.train.batch_size = 8
    c.train.num_steps = 600
    c.train.eval_every_steps = 200
    c.checkpoint.every_steps = 100
    c.log.every_steps = 25
  elif arg == 'knee':
    # The shipped model (easunet_jax/weights/eas_knee.npz): the full network trained on real-anatomy
    # phantoms with synthesised contrasts, at 0.73 mm in-plane pixels (half OAI-ZIB's); predict resamples.
    c.name = 'eas_knee'
    c.data.phantom_anatomy = 'reference'
    c.data.synth = True
    c.data.phantom_num = 60
    c.data.phantom_shape = (80, 192, 192)
    c.data.phantom_spacing = (1.4, 0.7292, 0.7292)
    c.data.split = (0.85, 0.05, 0.1)
    c.data.train_slices = 'all'  # slices without cartilage too: a whole scan is segmented
    c.optim.schedule = 'poly'
    c.train.batch_size = 8
    c.train.num_steps = 6000
    c.train.eval_every_steps = 250
    c.checkpoint.every_steps = 250
    c.predict.zoom = 1.1  # thin cartilage over more network pixels (README, The shipped model)
  elif arg:
    raise ValueError(f"configs/eas.py takes no argument, 'demo' or 'knee', got {arg!r}")
  return c
