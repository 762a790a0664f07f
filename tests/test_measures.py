"""Cartilage measures: the thickness of a flat sheet and of a tilted one, volumes, the share of slices and
voxels; on the real reference knee, compartments that partition the plates and a thickness that agrees with
surface-to-surface distances and stays put when a voxel size changes in its last digits."""

import numpy as np
import pytest

from easunet_jax import measures
from easunet_jax.data import knee


@pytest.mark.parametrize('pixels', [4, 5])
def test_thickness_of_a_flat_sheet_an_even_or_odd_number_of_pixels_thick(pixels):
  mask = np.zeros((12, 60, 60), bool)
  mask[1:11, 10:50, 20:20 + pixels] = True  # 0.4 mm pixels
  assert measures.mean_thickness_mm(mask, (1.0, 0.4, 0.4)) == pytest.approx(0.4 * pixels, abs=0.01)


def test_thickness_of_a_tilted_sheet_is_measured_across_it():
  # A 3 mm sheet at 30 degrees to the pixel grid: the distance to the background runs across the sheet.
  yy, xx = np.mgrid[:200, :200] * 0.25
  across = (yy - 25) * np.cos(np.pi / 6) - (xx - 25) * np.sin(np.pi / 6)
  mask = (np.abs(across) < 1.5) & (np.hypot(yy - 25, xx - 25) < 20)
  sheet = np.zeros((26, *mask.shape), bool)
  sheet[1:-1] = mask  # 24 mm wide across the slices
  assert measures.mean_thickness_mm(sheet, (1.0, 0.25, 0.25)) == pytest.approx(3.0, rel=0.1)


def test_an_empty_plate_has_no_volume_and_no_thickness():
  assert np.isnan(measures.mean_thickness_mm(np.zeros((3, 8, 8), bool), (1.0, 1.0, 1.0)))
  assert measures.volume_mm3(np.zeros((3, 8, 8), bool), (1.0, 1.0, 1.0)) == 0.0


def test_cartilage_measures_of_two_plates():
  """Two slabs along the grid, each measured as itself: 15 mm long, 4 mm wide (two sagittal slices), FC
  8 voxels = 2.0 mm and TC 12 voxels = 3.0 mm thick."""
  fc, tc = np.zeros((5, 40, 40), bool), np.zeros((5, 40, 40), bool)
  fc[0:2, 5:35, 10:18] = True  # 480 voxels in slices 0-1
  tc[2:4, 5:35, 25:37] = True  # 720 voxels in slices 2-3
  spacing = (2.0, 0.5, 0.25)
  got = measures.cartilage_measures({'fc': fc, 'tc': tc}, spacing)
  assert got['slices_with_cartilage'] == 0.8
  assert got['fc_volume_mm3'] == pytest.approx(480 * 2.0 * 0.5 * 0.25)
  assert got['tc_volume_mm3'] == pytest.approx(720 * 2.0 * 0.5 * 0.25)
  assert (got['fc_share_pct'], got['tc_share_pct']) == pytest.approx((100 * 480 / 8000, 100 * 720 / 8000))
  assert (got['fc_thickness_mm'], got['tc_thickness_mm']) == pytest.approx((2.0, 3.0))


def test_a_users_masks_of_0_and_1_measure_as_booleans_and_other_values_are_refused():
  """Plates as uint8 or float 0/1 (a user's arrays, nibabel's get_fdata) measure as boolean ones did; a plate
  of another value (a label map's FC 2: an even value had no thickness, a uint8 one indexed slices in the
  compartments' table) and a voxel size that is not positive are refused."""
  fc, tc = np.zeros((5, 40, 40), bool), np.zeros((5, 40, 40), bool)
  fc[0:2, 5:35, 10:18] = True
  tc[2:4, 5:35, 25:37] = True
  spacing = (2.0, 0.5, 0.25)
  expected, _ = measures.compartment_table(fc, tc, spacing, {})
  assert expected['fc']['thickness_mean_mm'] == pytest.approx(2.0)
  for dtype in (np.uint8, np.float32):
    got, _ = measures.compartment_table(fc.astype(dtype), tc.astype(dtype), spacing, {})
    assert got == expected
    assert measures.mean_thickness_mm(tc.astype(dtype), spacing) == pytest.approx(3.0)
  with pytest.raises(ValueError, match=r'^mask: expected a boolean mask .* got values such as \[2\]'):
    measures.mean_thickness_mm(fc * np.uint8(2), spacing)
  for bad in ((-2.0, 0.5, 0.25), (2.0, 0.5), 0.5):
    with pytest.raises(ValueError, match=r'^spacing: expected 3 positive voxel sizes in mm'):
      measures.volume_mm3(fc, bad)


def test_thickness_map_holds_the_sheet_thickness_at_every_voxel():
  mask = np.zeros((2, 60, 60), bool)
  mask[:, 10:50, 20:25] = True
  thickness, ridge = measures.thickness_map_mm(mask, (1.0, 0.4, 0.4))
  assert ridge.any() and not (ridge & ~mask).any()
  np.testing.assert_allclose(thickness[mask], 2.0, atol=0.05)
  assert not thickness[~mask].any()


def test_thickness_map_takes_the_nearest_ridge_voxel_in_mm():
  """Sagittal slices of 2 mm, pixels of 0.3: a plate 0.9 mm thick in slices 1-3 and 3 mm in slices 4-6. Every
  voxel of a thick slice lies within 1.5 mm of its own slice's ridge, 2 mm or more from the thin slices':
  each slice holds its own thickness (in voxel units, the thick slices' edges took the thin one's)."""
  mask = np.zeros((8, 30, 30), bool)
  mask[1:4, 5:25, 10:13] = True
  mask[4:7, 5:25, 10:20] = True
  thickness, _ = measures.thickness_map_mm(mask, (2.0, 0.3, 0.3))
  np.testing.assert_allclose(thickness[1:4][mask[1:4]], 0.9, rtol=1e-6)
  np.testing.assert_allclose(thickness[4:7][mask[4:7]], 3.0, rtol=1e-6)


def test_a_region_over_a_whole_plate_measures_as_the_plate():
  fc, tc = np.zeros((6, 40, 40), bool), np.zeros((6, 40, 40), bool)
  fc[1:5, 5:35, 25:30] = True
  tc[1:5, 5:35, 5:12] = True
  everywhere = np.ones(fc.shape, bool)
  table, _ = measures.compartment_table(fc, tc, (1.0, 0.4, 0.4), {'fc_all': everywhere, 'tc_all': everywhere})
  assert table['tc_all'] == table['tc'] and table['fc_all'] == table['fc']
  assert table['tc']['thickness_mean_mm'] == pytest.approx(2.8) and table['fc']['area_mm2'] > 0


def test_region_measures_of_a_sheet_half_thinner_than_1_mm():
  # Odd pixel counts across: one ridge voxel per row (an even count has two, which weighs it double).
  mask = np.zeros((22, 60, 60), bool)
  mask[1:-1, 10:30, 20:27] = True  # 7 pixels of 0.3 mm: 2.1 mm
  mask[1:-1, 30:50, 22:25] = True  # 0.9 mm
  spacing = (1.0, 0.3, 0.3)
  thickness, ridge = measures.thickness_map_mm(mask, spacing)
  got = measures.region_measures(mask, thickness, ridge, spacing)
  assert got['volume_mm3'] == pytest.approx(mask.sum() * np.prod(spacing))
  assert 0.35 < got['thin_fraction'] < 0.65  # half of the area, give or take the edges
  assert got['thickness_max_mm'] == pytest.approx(2.1, abs=0.05)
  assert got['thickness_median_mm'] <= got['thickness_p95_mm'] <= got['thickness_max_mm']
  assert got['area_mm2'] == pytest.approx(got['volume_mm3'] / got['thickness_mean_mm'])


def test_region_measures_of_given_thicknesses_count_1_mm_as_not_thinner_than_1_mm():
  mask = np.zeros((1, 1, 5), bool)
  mask[..., :4] = True
  thickness = np.array([[[0.5, 1.0, 1.5, 3.0, 0.0]]], np.float32)
  got = measures.region_measures(mask, thickness, mask, (1.0, 0.5, 0.5))
  assert got == pytest.approx({'volume_mm3': 1.0, 'thickness_mean_mm': 1.5, 'thickness_median_mm': 1.25,
                               'thickness_p95_mm': 2.775, 'thickness_max_mm': 3.0, 'area_mm2': 1 / 1.5,
                               'thin_fraction': 0.25})
  empty = measures.region_measures(np.zeros_like(mask), thickness, mask, (1.0, 0.5, 0.5))
  assert empty['volume_mm3'] == 0 and all(np.isnan(v) for k, v in empty.items() if k != 'volume_mm3')


@pytest.fixture(scope='module')
def reference():
  return knee.reference()


@pytest.mark.parametrize('laterality, sides_known', [('R', True), ('L', True), (None, True), ('R', False)])
def test_compartments_partition_the_plates(reference, laterality, sides_known):
  labels, spacing = reference
  fc, tc = labels == 2, labels == 4
  regions = measures.compartment_regions(fc, tc, spacing, measures.side_names(laterality, sides_known))
  parts = {name: {'fc': fc, 'tc': tc}[name[:2]] & region for name, region in regions.items()}
  sides = (('medial', 'lateral') if laterality and sides_known else
           ('left', 'right') if sides_known else ('side1', 'side2'))
  assert sorted(parts) == sorted([f'fc_{s}' for s in (*sides, 'trochlea')] + [f'tc_{s}' for s in sides])
  for plate, mask in (('fc', fc), ('tc', tc)):
    mine = [m for name, m in parts.items() if name.startswith(plate)]
    assert np.array_equal(np.sum(mine, axis=0), mask)  # every voxel in exactly one compartment
    assert all(m.any() for m in mine)
  # The medial tibial plate of a right knee lies towards the patient's left: lower axis-0 indices.
  if laterality and sides_known:
    medial, lateral = (np.nonzero(parts[f'tc_{s}'])[0].mean() for s in ('medial', 'lateral'))
    assert (medial < lateral) == (laterality == 'R')
  # The trochlea lies anterior (higher axis-1 indices) of the condyles.
  condyles = parts[f'fc_{sides[0]}'] | parts[f'fc_{sides[1]}']
  assert np.nonzero(parts['fc_trochlea'])[1].mean() > np.nonzero(condyles)[1].mean() + 20


def test_the_split_is_the_middle_of_the_tibial_gap():
  """Plates on slices 2-9 and 15-27: the gap is 10-14, its middle 12; with no tibial cartilage, the
  femoral cartilage's gap (one slice, 20) is taken; with none, None."""
  tc = np.zeros((30, 4, 4), bool)
  tc[2:10] = tc[15:28] = True
  fc = np.ones_like(tc)
  fc[20] = False
  assert measures.medial_lateral_split(fc, tc) == 12.0
  assert measures.medial_lateral_split(fc, np.zeros_like(tc)) == 20.0
  assert measures.medial_lateral_split(np.zeros_like(tc), np.zeros_like(tc)) is None
  # Two equally empty gaps: the one nearer the middle of the plates (slice 19.5) is the eminence.
  tc = np.zeros((40, 4, 4), bool)
  tc[2:38] = True
  tc[12:14] = tc[19:22] = False
  assert measures.medial_lateral_split(np.ones_like(tc), tc) == 20.0


def test_one_plate_alone_is_not_split_into_halves(reference):
  """The reference knee (a right knee: medial plates at low axis-0 indices, split 86.5) cut to one side of
  its tibial gap: with the femur whole, its notch parts the halves; with the femur cut too (a field of view
  of half the knee), nothing does, and no compartment is measured, instead of one plate named two."""
  labels, spacing = reference
  fc, tc = labels == 2, labels == 4
  assert measures.medial_lateral_split(fc, tc) == 86.5
  medial = np.arange(len(labels))[:, None, None] < 87
  assert measures.medial_lateral_split(fc, tc & medial) == 88.0
  for side in (medial, ~medial):
    assert measures.medial_lateral_split(fc & side, tc & side) is None
    assert measures.compartment_regions(fc & side, tc & side, spacing, measures.side_names('R')) == {}
    table, _ = measures.compartment_table(fc & side, tc & side, spacing, {})
    assert list(table) == ['fc', 'tc']


def test_the_trochlea_starts_at_the_median_posterior_cartilage_of_the_notch():
  """Split at slice 10, 0.5 mm slices: the notch's slices are 6-14 (2 mm). Their cartilage starts at 20 on
  six of them, at 25 on the three middle ones; the condyles' slices, farther out, start at 5."""
  tc = np.zeros((21, 40, 4), bool)
  tc[2:8] = tc[13:19] = True
  fc = np.zeros_like(tc)
  fc[:, 5:30] = True
  fc[6:15, :20] = False
  fc[9:12, :25] = False
  regions = measures.compartment_regions(fc, tc, (0.5, 1.0, 1.0), ('medial', 'lateral'))
  assert np.flatnonzero(regions['fc_trochlea'][0, :, 0])[0] == 20
  # Slices 6 and 14 lie exactly 2 mm from the split, and count: starting at 25 there too, five of nine.
  fc[[6, 14], :25] = False
  regions = measures.compartment_regions(fc, tc, (0.5, 1.0, 1.0), ('medial', 'lateral'))
  assert np.flatnonzero(regions['fc_trochlea'][0, :, 0])[0] == 25
  # The split's own slice (10) lies in the lower axis-0 index's half.
  assert regions['tc_medial'][10].all() and not regions['tc_lateral'][10].any()


def test_compartment_volumes_in_the_table_add_up_to_the_plates(reference):
  labels, spacing = reference
  fc, tc = labels == 2, labels == 4
  regions = measures.compartment_regions(fc, tc, spacing, measures.side_names('R'))
  table, _ = measures.compartment_table(fc, tc, spacing, regions)
  for plate in ('fc', 'tc'):
    total = sum(row['volume_mm3'] for name, row in table.items() if name.startswith(plate + '_'))
    assert total == pytest.approx(table[plate]['volume_mm3'], rel=1e-12)


def test_thickness_does_not_hang_on_the_last_digits_of_the_voxel_size(reference):
  # The reference knee's header gives its two in-plane voxel sizes as 0.36458337 and 0.36458334 mm; a
  # float32 header or an oblique affine's column norms differ from the scanner's sizes in such digits.
  labels, spacing = reference
  tc = labels == 4
  exact = measures.thickness_map_mm(tc, spacing, tie_tolerance=0)
  means = []
  for size in (spacing[1], spacing[2], spacing[2] * (1 + 1e-6), spacing[2] * (1 - 1e-6)):
    thickness, ridge = measures.thickness_map_mm(tc, (spacing[0], spacing[1], size))
    means.append(thickness[ridge].mean())
  assert max(means) - min(means) < 1e-4
  # Without the tolerance the same sizes split the plate's ties differently.
  thickness, ridge = measures.thickness_map_mm(tc, (spacing[0], spacing[1], spacing[2] * (1 + 1e-6)),
                                               tie_tolerance=0)
  assert abs(exact[0][exact[1]].mean() - thickness[ridge].mean()) > 0.01


def test_thickness_agrees_with_surface_to_surface_distances(reference):
  labels, spacing = reference
  for plate, bone in ((2, 1), (4, 3)):
    ridge = measures.mean_thickness_mm(labels == plate, spacing)
    surface = measures.surface_thickness_mm(labels == plate, labels == bone, spacing)
    assert 1.2 < surface < 3.5
    assert np.isnan(measures.surface_thickness_mm(labels == plate, labels < 0, spacing))  # no bone
    assert ridge == pytest.approx(surface, rel=0.03)  # as the docstring says (+1.1 % FC, -2.9 % TC measured)
