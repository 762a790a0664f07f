"""Phantoms against the real reference knee: slices with cartilage, cartilage volume and mean thickness, per
subject and their spread.

python bench/phantom_stats.py [--anatomy schematic|reference] [--num 5] [--reference labels.nii.gz]
  [--every 1] [--oa_fraction 0]: subjects 0..num-1 of the default data set (seed 0) at OAI-ZIB geometry
(with --every N only every N-th sagittal slice is generated: N times faster, volumes then estimated from
those slices; `--oa_fraction`: that fraction of real-anatomy subjects osteoarthritic) and a real
knee's OAI-ZIB label map (by default the reference knee shipped in easunet_jax/data/reference/); prints a
Markdown table of the reference, the phantom's mean, range and coefficient of variation, then one JSON line.
The measures are `easunet_jax.measures.cartilage_measures` (3D local thickness).
"""

import argparse
import functools
import json
import pathlib

import numpy as np

from easunet_jax import measures
from easunet_jax.data import knee, phantom, volumes
from easunet_jax.errors import positive_int, run_cli

ROWS = (('slices_with_cartilage', 'sagittal slices with cartilage (fraction)'),
        ('fc_volume_mm3', 'femoral cartilage volume (mm^3)'),
        ('tc_volume_mm3', 'tibial cartilage volume (mm^3)'),
        ('fc_thickness_mm', 'femoral cartilage mean thickness (mm)'),
        ('tc_thickness_mm', 'tibial cartilage mean thickness (mm)'))
GENERATORS = {'schematic': phantom.make_tissues, 'reference': knee.make_tissues}


def _measures(labels: np.ndarray, spacing) -> dict[str, float]:
  plates = {name: labels == value for name, value in volumes.OAI_ZIB_CARTILAGE.items()}
  return measures.cartilage_measures(plates, spacing)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--anatomy', choices=sorted(GENERATORS), default='reference')
  parser.add_argument('--num', type=positive_int, default=5, help='phantom subjects')
  parser.add_argument('--reference', default=str(knee.REFERENCE), help='a real label map in OAI-ZIB labels')
  parser.add_argument('--every', type=positive_int, default=1, help='generate every N-th sagittal slice only')
  parser.add_argument('--oa_fraction', type=float, default=0.0,
                      help='reference anatomy: the fraction of osteoarthritic subjects')
  args = parser.parse_args()
  generator = GENERATORS[args.anatomy]
  if args.anatomy == 'reference':
    generator = functools.partial(generator, oa_fraction=args.oa_fraction)
  identity = ((1, 1), (2, 2), (3, 3), (4, 4))
  path = pathlib.Path(args.reference)
  labels, spacing = volumes.load_labels(volumes.Case('reference', None, path), identity)
  reference = _measures(labels[::args.every], (spacing[0] * args.every, *spacing[1:]))
  shape = (phantom.DEFAULT_SHAPE[0] // args.every, *phantom.DEFAULT_SHAPE[1:])
  grid = (phantom.DEFAULT_SPACING[0] * args.every, *phantom.DEFAULT_SPACING[1:])
  subjects = []
  for i in range(args.num):
    _, tissue, _ = generator(phantom.subject_seed(0, i), shape, grid)
    subjects.append(_measures(phantom.LABEL_OF_TISSUE[tissue], grid))
  values = {k: np.array([s[k] for s in subjects]) for k, _ in ROWS}
  print(f'| statistic | reference knee | {args.anatomy} phantom, mean of {args.num} (range) | '
        'CV % (population std) | phantom / reference |')
  print('|---|---|---|---|---|')
  for key, text in ROWS:
    v = values[key]
    print(f'| {text} | {reference[key]:.3f} | {v.mean():.3f} ({v.min():.3f}-{v.max():.3f}) | '
          f'{100 * v.std() / v.mean():.1f} | {v.mean() / reference[key]:.2f} |')
  print(json.dumps({'anatomy': args.anatomy, 'every': args.every, 'oa_fraction': args.oa_fraction,
                    'reference': reference,
                    'phantom': subjects}))


if __name__ == '__main__':
  run_cli(main)
