"""Cartilage morphometry of segmentation masks: volume, mean thickness and how much of the volume a plate
takes. `predict` reports them for each mask it writes; `bench/phantom_stats.py` compares the phantom's
with a real knee's.

Masks are boolean (S, H, W) arrays in closest-canonical RAS order: axis 0 is left-right, so `mask[i]` is a
sagittal slice, and `spacing` is the voxel size in mm in that order.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def volume_mm3(mask: np.ndarray, spacing: Sequence[float]) -> float:
  """Voxel count times voxel volume."""
  return float(np.count_nonzero(mask) * np.prod(spacing))


def mean_thickness_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
  """Mean thickness of a cartilage plate in the sagittal plane (0 for an empty mask).

  In each sagittal slice, the 2D Euclidean distance (mm) from every plate pixel to the nearest pixel
  outside the plate is taken on the plate's medial ridge: the pixels that are a local maximum of that
  distance in their 3 x 3 neighbourhood. The thickness there is 2 x distance - one pixel, because the
  distance runs to the centre of the first outside pixel, half a pixel beyond the boundary on each side.
  The mean is over the ridge pixels of all slices. This is a thickness in the sagittal plane, not the 3D
  surface-normal thickness of cartilage-analysis software.
  """
  in_plane = tuple(spacing[1:])
  ridge = []
  for plate_HW in mask[mask.any(axis=(1, 2))]:
    distance = ndimage.distance_transform_edt(plate_HW, sampling=in_plane)
    ridge.append(distance[plate_HW & (distance >= ndimage.maximum_filter(distance, 3))])
  return float(2 * np.concatenate(ridge).mean() - min(in_plane)) if ridge else 0.0


def cartilage_measures(plates: Mapping[str, np.ndarray], spacing: Sequence[float]) -> dict[str, float]:
  """Measures of named plates (e.g. {'fc': ..., 'tc': ...}) of one volume.

  slices_with_cartilage: fraction of sagittal slices holding any plate.
  <name>_share_pct: the plate's voxels per 100 voxels of the volume.
  <name>_volume_mm3, <name>_thickness_mm: `volume_mm3` and `mean_thickness_mm` of the plate.
  """
  masks = [np.asarray(mask, bool) for mask in plates.values()]
  measures = {'slices_with_cartilage': float(np.logical_or.reduce(masks).any(axis=(1, 2)).mean())}
  for name, mask in zip(plates, masks):
    measures[f'{name}_share_pct'] = float(100 * mask.mean())
    measures[f'{name}_volume_mm3'] = volume_mm3(mask, spacing)
    measures[f'{name}_thickness_mm'] = mean_thickness_mm(mask, spacing)
  return measures
