"""Cartilage morphometry of segmentation masks, the one place predict, evaluate and the phantom statistics
take it from: per-voxel (3D local) thickness, volume, mid-surface area, the split of each plate into the
compartments readers report (medial and lateral tibial plates; medial and lateral femoral condyles and the
trochlea), and the table rows of all of these.

Masks are boolean (S, H, W) arrays in closest-canonical RAS order: axis 0 runs from the patient's left to
right (`mask[i]` is a sagittal slice), axis 1 to anterior, axis 2 to superior; `spacing` is the voxel size
in mm in that order.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial

from easunet_jax import metrics

THIN_MM = 1.0  # thinner than this counts towards the denuded-area proxy
_NOTCH_HALF_WIDTH_MM = 2.0  # sagittal slices this close to the medial-lateral split show the notch
# The emptiest slices part two plates only where they hold at most this share of the fullest slice on either
# side: the reference knee's tibial gap holds none, its femoral notch 0.43 (the trochlea bridges it), and one
# plate alone (a half field of view, a plate denuded or missed) has no dip at all.
_GAP_SHARE = 0.5


def volume_mm3(mask: np.ndarray, spacing: Sequence[float]) -> float:
  """Voxel count times voxel volume."""
  mask = metrics.as_mask(mask, 'mask')
  return float(np.count_nonzero(mask) * np.prod(metrics.check_spacing(spacing, mask.ndim)))


def thickness_map_mm(mask: np.ndarray, spacing: Sequence[float],
                     tie_tolerance: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
  """(thickness, ridge): the plate's local thickness (mm, float32) at each of its voxels, 0 elsewhere, and the
  medial-surface voxels where it is measured.

  The plate is split into half voxels along every axis, so that it is an even number of them thick and its
  medial surface is the pair of middle layers: there the 3D Euclidean distance (mm) to the centre of the
  nearest half voxel outside the plate is a local maximum in the 3 x 3 x 3 neighbourhood, and twice it is
  the diameter of the largest sphere inside the plate, exact for a plate along the voxel grid (with whole
  voxels a plate 2k voxels thick would read 2k - 1). A voxel is on the ridge when one of its half voxels is,
  with the largest of their thicknesses; every other plate voxel takes the thickness of the nearest ridge
  voxel. On the reference knee it agrees within 3 % with `surface_thickness_mm`.

  A distance within `tie_tolerance` (relative) of its neighbourhood's largest counts as a maximum: the
  middle layers of a plate along the grid hold equal distances, and exact equality would hang on the last
  digits of the voxel sizes (a float32 header's, an oblique affine's column norms) and on the transform's
  rounding (on the reference knee, one in-plane voxel size changed by a millionth of itself moved the tibial
  plate's mean by 2 %). 0 keeps exact ties only.
  """
  mask = metrics.as_mask(mask, 'mask')
  spacing = metrics.check_spacing(spacing, mask.ndim)
  thickness = np.zeros(mask.shape, np.float32)
  ridge = np.zeros(mask.shape, bool)
  if not mask.any():
    return thickness, ridge
  box = metrics.bounding_box(mask)
  plate = np.pad(mask[box], 1)  # background all round: the distance transform measures to it
  halves = plate.repeat(2, 0).repeat(2, 1).repeat(2, 2)
  distance = ndimage.distance_transform_edt(halves, sampling=np.asarray(spacing, float) / 2)
  on_ridge = halves & (distance >= (1 - tie_tolerance) * ndimage.maximum_filter(distance, 3))
  blocks = np.where(on_ridge, 2 * distance, 0).reshape(
      plate.shape[0], 2, plate.shape[1], 2, plate.shape[2], 2).max(axis=(1, 3, 5))
  # The nearest ridge voxel of every voxel: the distance transform of the ridge's complement.
  nearest = ndimage.distance_transform_edt(blocks == 0, sampling=spacing, return_distances=False,
                                           return_indices=True)
  inner = (slice(1, -1),) * 3
  thickness[box] = np.where(plate, blocks[tuple(nearest)], 0)[inner]
  ridge[box] = (blocks > 0)[inner]
  return thickness, ridge


def mean_thickness_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
  """Mean of `thickness_map_mm` over the plate's ridge voxels (NaN for an empty mask: no thickness)."""
  thickness, ridge = thickness_map_mm(mask, spacing)
  return float(thickness[ridge].mean()) if ridge.any() else float('nan')


def surface_thickness_mm(plate: np.ndarray, bone: np.ndarray, spacing: Sequence[float]) -> float:
  """Mean thickness of a plate measured another way than `thickness_map_mm`, to check it on label maps that
  hold the bone: from each plate voxel on the bone interface, the 3D distance to the nearest plate voxel on
  the articular surface (touching neither plate nor bone), plus one in-plane pixel for the half voxel beyond
  each of the two voxel centres. NaN without an interface (no plate, or no bone beside it)."""
  plate, bone = metrics.as_mask(plate, 'plate'), metrics.as_mask(bone, 'bone')
  spacing = np.asarray(metrics.check_spacing(spacing, plate.ndim))
  inner = plate & ndimage.binary_dilation(bone)
  outer = plate & ndimage.binary_dilation(~plate & ~bone)
  if not inner.any() or not outer.any():
    return float('nan')
  distance, _ = spatial.cKDTree(np.argwhere(outer) * spacing).query(np.argwhere(inner) * spacing)
  return float(distance.mean() + spacing[1:].min())


def cartilage_measures(plates: Mapping[str, np.ndarray], spacing: Sequence[float]) -> dict[str, float]:
  """Measures of named plates (e.g. {'fc': ..., 'tc': ...}) of one volume.

  slices_with_cartilage: fraction of sagittal slices holding any plate.
  <name>_share_pct: the plate's voxels per 100 voxels of the volume.
  <name>_volume_mm3, <name>_thickness_mm: `volume_mm3` and `mean_thickness_mm` of the plate.
  """
  masks = [metrics.as_mask(mask, name) for name, mask in plates.items()]
  measures = {'slices_with_cartilage': float(np.logical_or.reduce(masks).any(axis=(1, 2)).mean())}
  for name, mask in zip(plates, masks):
    measures[f'{name}_share_pct'] = float(100 * mask.mean())
    measures[f'{name}_volume_mm3'] = volume_mm3(mask, spacing)
    measures[f'{name}_thickness_mm'] = mean_thickness_mm(mask, spacing)
  return measures


# An adult knee's cartilage spans 60-100 mm from left to right; wider, the field of view holds both knees.
ONE_KNEE_MAX_WIDTH_MM = 130.0


def left_right_width_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
  """How far (mm) a canonical-order mask spans along axis 0, left to right: its first to last sagittal slice
  holding any of it, both whole; 0 for an empty mask."""
  occupied = np.flatnonzero(np.asarray(mask).any(axis=(1, 2)))
  return float((occupied[-1] - occupied[0] + 1) * spacing[0]) if occupied.size else 0.0


def medial_lateral_split(fc: np.ndarray, tc: np.ndarray) -> float | None:
  """The sagittal slice position (axis-0 index, may be half-way) that parts the knee's medial and lateral
  halves: the middle of the emptiest run of slices of the tibial cartilage (the intercondylar eminence
  between its two plates) within the central half of its extent; the femoral cartilage's (the notch) where
  the tibial has no such gap. A run is a gap only where it dips to `_GAP_SHARE` of the fullest slice on
  either side. None where neither plate has one: both empty, or one plate alone (a field of view that holds
  half the knee, a plate denuded or missed), whose halves are not the knee's."""
  for plate in (tc, fc):
    counts = plate.sum(axis=(1, 2))
    occupied = np.flatnonzero(counts)
    if occupied.size:
      first, last = occupied[0], occupied[-1]
      quarter = (last - first) // 4
      central = np.arange(first + quarter, last - quarter + 1)
      emptiest = central[counts[central] == counts[central].min()]
      # Slices tied at the minimum form runs; the run holding the most central slice is the gap.
      runs = np.split(emptiest, np.flatnonzero(np.diff(emptiest) > 1) + 1)
      middle = (first + last) / 2
      run = min(runs, key=lambda r: min(abs(r - middle)))
      beside = min(counts[:run[0]].max(initial=0), counts[run[-1] + 1:].max(initial=0))
      if counts[run[0]] <= _GAP_SHARE * beside:
        return float(run[0] + run[-1]) / 2
  return None


def side_names(laterality: str | None, sides_known: bool = True) -> tuple[str, str]:
  """Names of the halves of a knee that `medial_lateral_split` parts, the lower axis-0 index's first: medial
  and lateral for laterality 'R' or 'L' (the medial side of a right knee lies towards the patient's left, of
  a left knee towards the right); the patient's left and right for laterality None. Where axis 0 is not
  known to run from the patient's left to right (`sides_known` False: the orientation check took another of
  the header's axes for left-right, in an unknown direction), neither can be told: 'side1' and 'side2'."""
  if not sides_known:
    return 'side1', 'side2'
  return {'R': ('medial', 'lateral'), 'L': ('lateral', 'medial')}.get(laterality, ('left', 'right'))


def compartment_regions(fc: np.ndarray, tc: np.ndarray, spacing: Sequence[float], sides: tuple[str, str]
                        ) -> dict[str, np.ndarray]:
  """The regions of space, as boolean masks that broadcast against the plates, of the compartments
  'fc_<side>' and 'tc_<side>' of both `sides` (`side_names`) and 'fc_trochlea'; each plate's regions part
  space, and so any mask of that plate, exactly. None (an empty dict) where `medial_lateral_split` finds no
  gap between the knee's halves.

  The sides are the two halves of `medial_lateral_split`, sides[0] the lower axis-0 index's. The trochlea is
  the femoral cartilage anterior to the intercondylar notch: anterior of the median posterior-most femoral
  cartilage of the sagittal slices within 2 mm of the split, where only the trochlear groove carries
  cartilage.
  """
  split = medial_lateral_split(fc, tc)
  if split is None:
    return {}
  upper = np.arange(fc.shape[0])[:, None, None] > split
  halves = dict(zip(sides, (~upper, upper)))
  trochlea = np.zeros((1, fc.shape[1], 1), bool)
  near = np.flatnonzero(np.abs(np.arange(fc.shape[0]) - split) <= _NOTCH_HALF_WIDTH_MM / spacing[0])
  posterior_most = [np.flatnonzero(fc[i].any(axis=1))[0] for i in near if fc[i].any()]
  if posterior_most:
    trochlea[:, int(np.median(posterior_most)):] = True
  regions = {'fc_trochlea': trochlea}
  for side, mask in halves.items():
    regions[f'fc_{side}'] = mask & ~trochlea
    regions[f'tc_{side}'] = mask
  return dict(sorted(regions.items()))


def region_measures(mask: np.ndarray, thickness: np.ndarray, ridge: np.ndarray, spacing: Sequence[float]
                    ) -> dict[str, float]:
  """Volume (mm^3), thickness statistics (mm) over the region's ridge voxels (mean, median, 95th percentile,
  max), mid-surface area (mm^2: volume / mean thickness) and the fraction of the ridge thinner than 1 mm (a
  proxy of denuded area) of a region of a plate whose `thickness_map_mm` is (thickness, ridge). A region
  without cartilage has volume 0 and the rest undefined (NaN), not 0 mm: a cohort's mean thickness leaves
  it out."""
  mask = metrics.as_mask(mask, 'mask')
  volume = volume_mm3(mask, spacing)
  values = thickness[mask & ridge]
  if not values.size:
    return {'volume_mm3': volume} | dict.fromkeys(
        ('thickness_mean_mm', 'thickness_median_mm', 'thickness_p95_mm', 'thickness_max_mm', 'area_mm2',
         'thin_fraction'), float('nan'))
  mean = float(values.mean())
  return {'volume_mm3': volume, 'thickness_mean_mm': mean, 'thickness_median_mm': float(np.median(values)),
          'thickness_p95_mm': float(np.percentile(values, 95)), 'thickness_max_mm': float(values.max()),
          'area_mm2': volume / mean, 'thin_fraction': float(np.mean(values < THIN_MM))}


def compartment_table(fc: np.ndarray, tc: np.ndarray, spacing: Sequence[float],
                      regions: Mapping[str, np.ndarray]) -> tuple[dict[str, dict[str, float]], np.ndarray]:
  """({region: `region_measures`} for 'fc', 'tc' and each of their compartments, the plates within
  `regions` (`compartment_regions`, of these plates or of another segmentation of the same knee), and the
  thickness map of both plates (mm, 0 outside))."""
  fc, tc = metrics.as_mask(fc, 'fc'), metrics.as_mask(tc, 'tc')
  table, thickness, ridges = {}, np.zeros(fc.shape, np.float32), {}
  for name, plate in (('fc', fc), ('tc', tc)):
    plate_thickness, ridges[name] = thickness_map_mm(plate, spacing)
    thickness += plate_thickness
    table[name] = region_measures(plate, plate_thickness, ridges[name], spacing)
  plates = {'fc': fc, 'tc': tc}
  for name, region in regions.items():
    table[name] = region_measures(plates[name[:2]] & region, thickness, ridges[name[:2]], spacing)
  return table, thickness
