"""Phantom against the real reference knee: slices with cartilage, cartilage voxel share, mean thickness.

python bench/phantom_stats.py [--num 5]: phantom subjects of the default dataset (seed 0) at OAI-ZIB
geometry, their mean, and the reference label map (../shared/data/); prints a Markdown table, then one JSON
line.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from easunet_jax.data import phantom, volumes

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/reference_knee_labels_oaizib.nii.gz'
ROWS = (('slices_with_cartilage', 'sagittal slices with cartilage (fraction)'),
        ('fc_share_pct', 'femoral cartilage voxels (% of the volume)'),
        ('tc_share_pct', 'tibial cartilage voxels (% of the volume)'),
        ('fc_thickness_mm', 'femoral cartilage mean thickness (mm)'),
        ('tc_thickness_mm', 'tibial cartilage mean thickness (mm)'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num', type=int, default=5, help='phantom subjects')
  parser.add_argument('--reference', default=str(REFERENCE), help='a real label map in OAI-ZIB labels')
  args = parser.parse_args()
  identity = ((1, 1), (2, 2), (3, 3), (4, 4))
  _, labels, spacing = volumes.load_case(volumes.Case('reference', pathlib.Path(args.reference),
                                                      pathlib.Path(args.reference)), identity)
  reference = phantom.cartilage_statistics(labels, spacing)
  subjects = [phantom.cartilage_statistics(phantom.make_subject(phantom.subject_seed(0, i))[1],
                                           phantom.DEFAULT_SPACING) for i in range(args.num)]
  mean = {k: float(np.mean([s[k] for s in subjects])) for k in reference}
  lo = {k: min(s[k] for s in subjects) for k in reference}
  hi = {k: max(s[k] for s in subjects) for k in reference}
  print(f'| statistic | reference knee | phantom, mean of {args.num} (range) | phantom / reference |')
  print('|---|---|---|---|')
  for key, text in ROWS:
    print(f'| {text} | {reference[key]:.3f} | {mean[key]:.3f} ({lo[key]:.3f}-{hi[key]:.3f}) | '
          f'{mean[key] / reference[key]:.2f} |')
  print(json.dumps({'reference': reference, 'phantom_mean': mean, 'phantom': subjects}))


if __name__ == '__main__':
  main()
