"""Cartilage measures: the thickness of a flat sheet and of a tilted one, volumes, and the share of slices and
voxels."""

import numpy as np
import pytest
from scipy import ndimage

from easunet_jax import measures


def test_thickness_of_a_flat_sheet():
  mask = np.zeros((2, 60, 60), bool)
  mask[:, 10:50, 20:25] = True  # 5 pixels of 0.4 mm: 2 mm
  assert measures.mean_thickness_mm(mask, (1.0, 0.4, 0.4)) == pytest.approx(2.0, abs=0.05)


def test_thickness_of_a_tilted_sheet_is_measured_across_it():
  # A 3 mm sheet at 30 degrees to the pixel grid: the distance to the background runs across the sheet.
  yy, xx = np.mgrid[:200, :200] * 0.25
  across = (yy - 25) * np.cos(np.pi / 6) - (xx - 25) * np.sin(np.pi / 6)
  mask = (np.abs(across) < 1.5) & (np.hypot(yy - 25, xx - 25) < 20)
  assert measures.mean_thickness_mm(mask[None], (1.0, 0.25, 0.25)) == pytest.approx(3.0, rel=0.1)


def test_empty_plate_measures_zero():
  assert measures.mean_thickness_mm(np.zeros((3, 8, 8), bool), (1.0, 1.0, 1.0)) == 0.0
  assert measures.volume_mm3(np.zeros((3, 8, 8), bool), (1.0, 1.0, 1.0)) == 0.0


def test_cartilage_measures_of_two_plates():
  fc, tc = np.zeros((4, 10, 10), bool), np.zeros((4, 10, 10), bool)
  fc[1, 2:4, 2:8] = True  # 12 voxels in slice 1
  tc[2, 6:9, 1:5] = True  # 12 voxels in slice 2
  tc[2] = ndimage.binary_dilation(tc[2])  # grown in-plane only
  spacing = (2.0, 0.5, 0.25)
  got = measures.cartilage_measures({'fc': fc, 'tc': tc}, spacing)
  assert got['slices_with_cartilage'] == 0.5
  assert got['fc_volume_mm3'] == pytest.approx(12 * 2.0 * 0.5 * 0.25)
  assert got['tc_volume_mm3'] == pytest.approx(tc.sum() * 2.0 * 0.5 * 0.25)
  assert got['fc_share_pct'] == pytest.approx(100 * 12 / 400)
  assert got['fc_thickness_mm'] == pytest.approx(measures.mean_thickness_mm(fc, spacing))
