"""Ablations of EAS U-Net: the full network and each of its parts switched off or replaced in turn.

  python -m easunet_jax.sweep --sweep=configs/sweep_ablation.py --workdir=runs/ablation
  python -m easunet_jax.sweep --sweep=configs/sweep_ablation.py:demo ...   # the configs' CPU demo size
"""


def sweep(add) -> None:
  add('eas_unet', 'configs/eas.py', 'EAS U-Net')
  add('standard_blocks', 'configs/eas.py', 'standard 3x3 blocks', **{'model.block': 'standard'})
  add('no_eca', 'configs/eas.py', 'ECA off', **{'model.eca': False})
  add('no_eas', 'configs/eas.py', 'EAS (ECA-ASPP) off', **{'model.eas': False})
  add('no_deep_supervision', 'configs/eas.py', 'deep supervision off', **{'model.deep_supervision': False})
  add('add_fusion', 'configs/eas.py', 'add fusion', **{'model.fusion': 'add'})
