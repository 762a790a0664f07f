"""The paper's Table 1: EAS U-Net against U-Net, U-Net++ and Attention U-Net, same data and training.

  python -m easunet_jax.sweep --sweep=configs/sweep_table1.py --workdir=runs/table1
  python -m easunet_jax.sweep --sweep=configs/sweep_table1.py:demo ...   # the configs' CPU demo size
"""


def sweep(add) -> None:
  add('eas_unet', 'configs/eas.py', 'EAS U-Net')
  add('unet', 'configs/unet.py', 'U-Net')
  add('unetpp', 'configs/unetpp.py', 'U-Net++')
  add('attention_unet', 'configs/attention_unet.py', 'Attention U-Net')
