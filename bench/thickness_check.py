"""The reference knee's measures checked two ways: compartment volumes against plate volumes, and the mean
thickness of `measures.thickness_map_mm` (3D local thickness on the medial-surface ridge) against
surface-to-surface distances from the bone interface to the articular surface in 3D
(`measures.surface_thickness_mm`).

python bench/thickness_check.py [--labels easunet_jax/data/reference/knee_labels_oaizib.nii.gz]
  [--laterality R]: any OAI-ZIB label map (femur 1, FC 2, tibia 3, TC 4); prints a Markdown table per region
and one JSON line.
"""

import argparse
import json

from easunet_jax import measures
from easunet_jax.data import knee, volumes
from easunet_jax.errors import run_cli


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--labels', default=str(knee.REFERENCE), help='an OAI-ZIB label map')
  parser.add_argument('--laterality', choices=('R', 'L'), default='R', help='the knee (the reference: R)')
  args = parser.parse_args()
  plates = volumes.OAI_ZIB_CARTILAGE
  labels, spacing = volumes.load_labels(volumes.Case('labels', None, args.labels),
                                        [(value, value) for value in plates.values()])
  fc, tc = labels == plates['fc'], labels == plates['tc']
  regions = measures.compartment_regions(fc, tc, spacing, measures.side_names(args.laterality))
  table, _ = measures.compartment_table(fc, tc, spacing, regions)
  print('| Region | Volume mm³ | Mean thickness mm (ridge) | Median | P95 | Area mm² | < 1 mm |')
  print('|---|---|---|---|---|---|---|')
  for region, row in table.items():
    print(f"| {region} | {row['volume_mm3']:.0f} | {row['thickness_mean_mm']:.2f} | "
          f"{row['thickness_median_mm']:.2f} | {row['thickness_p95_mm']:.2f} | {row['area_mm2']:.0f} | "
          f"{100 * row['thin_fraction']:.1f} % |")
  check = {}
  for plate, mask, bone in (('fc', fc, labels == 1), ('tc', tc, labels == 3)):
    parts = sum(row['volume_mm3'] for name, row in table.items() if name.startswith(plate + '_'))
    surface = measures.surface_thickness_mm(mask, bone, spacing)
    ridge = table[plate]['thickness_mean_mm']
    check[plate] = {'volume_mm3': table[plate]['volume_mm3'], 'compartments_sum_mm3': parts,
                    'thickness_ridge_mm': ridge, 'thickness_surface_mm': surface,
                    'difference_pct': 100 * (ridge / surface - 1)}
    print(f'{plate.upper()}: compartments sum {parts:.3f} mm³ of {table[plate]["volume_mm3"]:.3f}; mean '
          f'thickness {ridge:.2f} mm (ridge) vs {surface:.2f} mm (surface to surface), '
          f'{check[plate]["difference_pct"]:+.1f} %')
  print(json.dumps({'spacing_mm': [float(s) for s in spacing], 'check': check}, default=float))


if __name__ == '__main__':
  run_cli(main)
