"""Phantom against the real reference knee: slices with cartilage, cartilage voxel share, mean thickness.

python bench/phantom_stats.py [--num 5] [--reference labels.nii.gz]: phantom subjects of the default
dataset (seed 0) at OAI-ZIB geometry, their mean, and a real knee's OAI-ZIB label map (by default the
reference knee in ../shared/data/ beside this checkout); prints a Markdown table, then one JSON line. The
measures are `easunet_jax.measures.cartilage_measures`.
"""

import argparse
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from easunet_jax import measures
from easunet_jax.data import phantom, volumes

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/reference_knee_labels_oaizib.nii.gz'
ROWS = (('slices_with_cartilage', 'sagittal slices with cartilage (fraction)'),
        ('fc_share_pct', 'femoral cartilage voxels (% of the volume)'),
        ('tc_share_pct', 'tibial cartilage voxels (% of the volume)'),
        ('fc_thickness_mm', 'femoral cartilage mean thickness (mm)'),
        ('tc_thickness_mm', 'tibial cartilage mean thickness (mm)'))


def _measures(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
  plates = {name: labels == value for name, value in volumes.OAI_ZIB_CARTILAGE.items()}
  return measures.cartilage_measures(plates, spacing)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num', type=int, default=5, help='phantom subjects')
  parser.add_argument('--reference', default=str(REFERENCE), help='a real label map in OAI-ZIB labels')
  args = parser.parse_args()
  identity = ((1, 1), (2, 2), (3, 3), (4, 4))
  _, labels, spacing = volumes.load_case(volumes.Case('reference', pathlib.Path(args.reference),
                                                      pathlib.Path(args.reference)), identity)
  reference = _measures(labels, spacing)
  subjects = [_measures(phantom.make_subject(phantom.subject_seed(0, i))[1], phantom.DEFAULT_SPACING)
              for i in range(args.num)]
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
