"""Parameters and forward GFLOPs of the four networks and EAS U-Net's ablations; prints a Markdown table.

  python bench/model_table.py [--size=384] [--depthwise_impl=xla]

GFLOPs are XLA's cost analysis of the jitted evaluation-mode forward pass of one (1, size, size, 1) slice,
compiled for this machine's backend but never run (shapes only, nothing is initialised). XLA counts a
multiply-add as 2 FLOPs. The depthwise convolutions are counted as grouped convolutions ('xla'): with
'shift' (the CPU default) XLA sees nine shifted multiply-adds and their zero padding as elementwise ops.
"""

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx

from configs import attention_unet, eas, unet, unetpp
from easunet_jax.models import abstract_model, stride

_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width (a multiple of the networks\' stride).',
                            lower_bound=1)
_DEPTHWISE = flags.DEFINE_enum('depthwise_impl', 'xla', ['xla', 'shift'],
                               "EAS U-Net's depthwise convolution as XLA counts it.")

# (row label, config module, model overrides): the baselines at their own configs, then one switch at a time.
ROWS = [('EAS U-Net', eas, {}), ('U-Net', unet, {}), ('U-Net++', unetpp, {}),
        ('Attention U-Net', attention_unet, {}),
        ("EAS U-Net, block='standard'", eas, {'block': 'standard'}),
        ('EAS U-Net, eca=False', eas, {'eca': False}), ('EAS U-Net, eas=False', eas, {'eas': False}),
        ('EAS U-Net, deep_supervision=False', eas, {'deep_supervision': False}),
        ("EAS U-Net, fusion='add'", eas, {'fusion': 'add'})]


def params_and_gflops(model_cfg: ml_collections.ConfigDict, size: int) -> tuple[int, float]:
  model = abstract_model(model_cfg)
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  model.eval()
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
  return params, compiled.cost_analysis()['flops'] / 1e9


def main(argv):
  del argv
  if _SIZE.value % (multiple := max(stride(c.get_config().model.features) for _, c, _ in ROWS)):
    raise app.UsageError(f'--size={_SIZE.value}: not a multiple of the networks\' stride, {multiple}')
  print(f'| model / ablation | params | GFLOPs ({_SIZE.value} x {_SIZE.value}, batch 1) |')
  print('|---|---:|---:|')
  for label, config_module, overrides in ROWS:
    model_cfg = config_module.get_config().model
    model_cfg.update(overrides, depthwise_impl=_DEPTHWISE.value)
    params, gflops = params_and_gflops(model_cfg, _SIZE.value)
    print(f'| {label} | {params:,} | {gflops:.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
