"""The real-anatomy phantom: the reference knee's labels, cartilage thickness scaling, mirroring, the
tissues placed around the bones, and the two renderings."""

import nibabel as nib
import numpy as np
import pytest

from easunet_jax import measures
from easunet_jax.data import knee, phantom

SHAPE, SPACING = (24, 96, 96), (4.0, 1.4, 1.4)


@pytest.fixture(scope='module')
def subject():
  return knee.make_tissues(3, SHAPE, SPACING)


def test_reference_is_the_shipped_real_knee():
  labels, spacing = knee.reference()
  assert labels.shape == (160, 384, 384)
  np.testing.assert_allclose(spacing, (0.7, 0.3646, 0.3646), atol=1e-4)
  assert np.bincount(labels.ravel(), minlength=5)[[2, 4]].tolist() == [127311, 40467]
  assert (knee.REFERENCE.parent / 'NOTICE.md').read_text().count('MIT') >= 1


def test_tissues_labels_and_affine(subject):
  image, tissue, affine = subject
  assert image.shape == tissue.shape == SHAPE and image.dtype == np.float32 and tissue.dtype == np.uint8
  assert nib.aff2axcodes(affine) == ('R', 'A', 'S')
  present = set(np.unique(tissue))
  for code in (phantom.AIR, phantom.FAT, phantom.MUSCLE, phantom.FEMUR, phantom.TIBIA, phantom.FC, phantom.TC,
               phantom.FLUID, phantom.MENISCUS, phantom.PATELLA, phantom.PATELLA_CARTILAGE, phantom.TENDON):
    assert code in present, code
  labels = phantom.LABEL_OF_TISSUE[tissue]
  assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
  z = np.arange(SHAPE[2])

  def centre_of(k):
    return (z * (labels == k).sum((0, 1))).sum() / (labels == k).sum()

  assert centre_of(1) > centre_of(2) > centre_of(4) > centre_of(3)  # femur, FC, TC, tibia from the top
  # The patella lies in front of (anterior to) the femoral cartilage, its cartilage (of 2-3 mL, 2.5 here)
  # behind it.
  y = np.arange(SHAPE[1])
  patella, patella_cartilage = tissue == phantom.PATELLA, tissue == phantom.PATELLA_CARTILAGE
  patella_centre = (y * patella.sum((0, 2))).sum() / patella.sum()
  assert patella_centre > (y * (labels == 2).sum((0, 2))).sum() / (labels == 2).sum()
  assert np.nonzero(patella_cartilage)[1].max() < patella_centre
  assert measures.volume_mm3(patella_cartilage, SPACING) > 1500


def test_about_half_the_subjects_are_left_knees():
  left = [knee._draw(np.random.default_rng(seed), knee.ELASTIC_MM)['left'] for seed in range(200)]
  assert 80 < sum(left) < 120


def test_deterministic_and_varied(subject):
  np.testing.assert_array_equal(knee.make_tissues(3, SHAPE, SPACING)[1], subject[1])
  assert np.mean(knee.make_tissues(4, SHAPE, SPACING)[1] != subject[1]) > 0.01


def test_elastic_field_strays_the_shapes_as_far_as_asked(subject):
  """One subject's bones under no elastic field, the default one and one three times as strong: the
  default moves them less than the strong one does."""
  def bones(tissue):
    return np.isin(phantom.LABEL_OF_TISSUE[tissue], (1, 3))

  rigid, strong = (bones(knee.make_tissues(3, SHAPE, SPACING, elastic_mm=mm)[1])
                   for mm in (0.0, 3 * knee.ELASTIC_MM))
  assert 0 < np.mean(rigid != bones(subject[1])) < np.mean(rigid != strong)


def test_large_effusion_fills_recesses_around_the_femur(subject, monkeypatch):
  """A large effusion turns muscle and fat near the femur into fluid, in front of it and behind it to the
  depth drawn for each, and leaves air, tendons, the tibia's surroundings, the bones and cartilage, and
  the subject's other draws, as they were."""
  drawn = {}
  tissues = knee._tissues
  def keep_the_draws(labels, spacing, k):
    drawn.update(labels=labels, k=k)
    return tissues(labels, spacing, k)

  monkeypatch.setattr(knee, '_tissues', keep_the_draws)
  tissue = knee.make_tissues(3, SHAPE, SPACING, effusion_mm=10.0)[1]
  np.testing.assert_array_equal(phantom.LABEL_OF_TISSUE[tissue], phantom.LABEL_OF_TISSUE[subject[1]])
  assert ((tissue == phantom.FLUID) & (subject[1] != phantom.FLUID)).sum() > 10 * (
      subject[1] == phantom.FLUID).sum()
  labels = phantom.LABEL_OF_TISSUE[subject[1]]
  near_femur = knee._edt(np.isin(labels, (1, 2)), SPACING) < 8.0
  off_tibia = knee._edt(np.isin(labels, (3, 4)), SPACING) > 2.0
  y = phantom.centred_mm(SHAPE, SPACING)[1].astype(np.float32)  # as _tissues: a row may lie on the line
  front_of = (y > y[(labels == 2).any((0, 2))].mean())[None, :, None]
  for depths, side in (((8.0, 0.0), front_of), ((0.0, 8.0), ~front_of)):
    tissue = tissues(drawn['labels'], SPACING, drawn['k'] | {'large_effusion': depths})
    added = (tissue == phantom.FLUID) & (subject[1] != phantom.FLUID)
    assert added.sum() > 100 and (added <= (side & near_femur & off_tibia)).all(), depths
    assert np.isin(subject[1][added], (phantom.MUSCLE, phantom.FAT)).all(), depths


def test_thickness_scaling():
  labels, spacing = knee.reference()
  thin, thick = knee.scaled_cartilage(0.8, 0.8), knee.scaled_cartilage(1.2, 1.2)
  for bone in (1, 3):
    np.testing.assert_array_equal(thin == bone, labels == bone)  # bone untouched
  every_4th = (4 * spacing[0], *spacing[1:])  # every 4th sagittal slice: 4 times faster, plates still whole
  for plate in (2, 4):
    t_thin, t_ref, t_thick = (measures.mean_thickness_mm(m[::4] == plate, every_4th)
                              for m in (thin, labels, thick))
    # Thinning scales the thickness (not halves it, as whole-voxel steps once did); growth is blocked
    # where the plates meet, so the tibial plate grows least.
    grown = 1.1 if plate == 2 else 1.0
    assert t_thin == pytest.approx(0.8 * t_ref, rel=0.1) and t_thick > grown * t_ref, (plate, t_thin, t_ref,
                                                                                         t_thick)
    v_thin, v_ref, v_thick = (np.count_nonzero(m == plate) for m in (thin, labels, thick))
    assert v_thin == pytest.approx(0.8 * v_ref, rel=0.05) and v_thick > 1.05 * v_ref, (plate, v_thin, v_ref,
                                                                                        v_thick)


def test_the_joint_shift_widens_or_narrows_the_joint_space():
  """The reference knee unmoved but for the joint shift: the centres of femur and tibia (with their plates)
  lie 0.57 mm farther apart for +1.2 mm and 0.38 mm nearer for -1.2 mm (the tibia moves, partly)."""
  labels, spacing = knee.reference()
  still = {'left': False, 'scale': np.ones(3), 'angles': np.zeros(3), 'shift': np.zeros(3),
           'elastic': np.zeros((3, 5, 5, 5))}
  shape, out_spacing = (12, 160, 160), (2.0, 0.9, 0.9)
  z = np.arange(shape[2]) * out_spacing[2]

  def gap(joint):
    out = knee._warp(labels, spacing, shape, out_spacing, still | {'joint': joint})
    femur, tibia = np.isin(out, (1, 2)).sum((0, 1)), np.isin(out, (3, 4)).sum((0, 1))
    return (z * femur).sum() / femur.sum() - (z * tibia).sum() / tibia.sum()

  assert gap(-1.2) < gap(0.0) - 0.3 and gap(1.2) > gap(0.0) + 0.3


def test_bone_size_scales_the_knee_along_each_axis():
  """The reference knee unmoved but for its size: 1.1 on every axis gives plates 1.1^3 = 1.33 times the
  volume; 1.2 along the vertical axis only makes them 1.2 times as tall and no wider or deeper."""
  labels, spacing = knee.reference()
  still = {'left': False, 'angles': np.zeros(3), 'shift': np.zeros(3), 'elastic': np.zeros((3, 5, 5, 5)),
           'joint': 0.0}
  shape, out_spacing = (64, 160, 160), (2.0, 1.0, 1.0)  # the whole knee, with room for it to grow

  def plates(scale):
    out = knee._warp(labels, spacing, shape, out_spacing, still | {'scale': np.asarray(scale, float)})
    cartilage = np.nonzero(np.isin(out, (2, 4)))
    return np.array([np.count_nonzero(out == 2), np.count_nonzero(out == 4)]), np.ptp(cartilage, axis=1)

  sizes, extent = plates([1.0, 1.0, 1.0])
  larger, _ = plates([1.1, 1.1, 1.1])
  np.testing.assert_allclose(larger / sizes, 1.1 ** 3, rtol=0.05)
  _, taller = plates([1.0, 1.0, 1.2])
  assert abs(taller[2] / extent[2] - 1.2) < 0.06, (taller, extent)
  assert np.abs(taller[:2] - extent[:2]).max() <= 1, (taller, extent)


def test_left_knee_is_the_mirror_of_the_right():
  labels, spacing = knee.reference()
  k = dict(left=False, scale=np.ones(3), angles=np.zeros(3), shift=np.zeros(3),
           elastic=np.zeros((3, 5, 5, 5)), joint=0.0)
  right = knee._warp(labels, spacing, SHAPE, SPACING, k)
  left = knee._warp(labels, spacing, SHAPE, SPACING, {**k, 'left': True})
  assert (right == 2).any()
  np.testing.assert_array_equal(left, right[::-1])


def test_dess_and_tse_contrasts_of_one_knee():
  dess_image, tissue, _ = knee.make_tissues(5, SHAPE, SPACING, contrast='dess')
  tse_image, tse_tissue, _ = knee.make_tissues(5, SHAPE, SPACING, contrast='tse')
  np.testing.assert_array_equal(tse_tissue, tissue)  # the same knee

  def mean(image, code):
    return image[tissue == code].mean()

  assert mean(dess_image, phantom.FC) > mean(dess_image, phantom.FEMUR) > mean(dess_image, phantom.MUSCLE)
  assert mean(tse_image, phantom.FEMUR) > mean(tse_image, phantom.FC)  # fatty marrow bright in TSE
  assert mean(tse_image, phantom.FAT) > mean(tse_image, phantom.FC)
  with pytest.raises(ValueError, match='contrast'):
    knee.make_tissues(5, SHAPE, SPACING, contrast='t1')


def test_tse_intensities_are_a_proton_density_contrast():
  """Bright fat and marrow, grey cartilage, fluid brighter than cartilage, dark muscle; black plates, menisci
  and tendons: in every draw."""
  for seed in range(10):
    t = knee.tse_intensities(np.random.default_rng(seed))
    for cartilage in (phantom.FC, phantom.TC, phantom.PATELLA_CARTILAGE):
      assert min(t[phantom.FAT], t[phantom.FEMUR], t[phantom.FLUID]) > t[cartilage] > t[phantom.MUSCLE]
    for black in (phantom.FEMUR_PLATE, phantom.TIBIA_PLATE, phantom.MENISCUS, phantom.TENDON):
      assert t[black] < 0.1 * t.max()


def test_defects_remove_weight_bearing_cartilage_to_the_depth_asked():
  labels, spacing = knee.reference()
  full = knee.with_defects(labels, {2: 1.0, 4: 1.0}, [(4, 0.5, 5.0, 0.0), (2, 0.5, 5.0, 0.0)])
  partial = knee.with_defects(labels, {2: 1.0, 4: 1.0}, [(4, 0.5, 5.0, 0.5), (2, 0.5, 5.0, 0.5)])
  for defects in (full, partial):
    np.testing.assert_array_equal(np.isin(defects, (1, 3)), np.isin(labels, (1, 3)))  # bone untouched
    assert set(np.unique(labels[defects == knee.DEFECT])) == {2, 4}  # only cartilage becomes a defect
  for plate in (2, 4):
    lost = (labels == plate) & (full == knee.DEFECT)
    # A 5 mm ball holds ~520 mm^3; a plate ~2 mm thick loses a disc of ~150 mm^3 through its whole depth.
    assert 60 < lost.sum() * np.prod(spacing) < 300, (plate, lost.sum() * np.prod(spacing))
    kept = (labels == plate) & (partial == plate) & (full == knee.DEFECT)
    assert 0.2 < kept.sum() / lost.sum() < 0.8  # the half nearest the bone stays
  fc = np.argwhere(full == knee.DEFECT)
  fc = fc[labels[tuple(fc.T)] == 2]
  # The femoral defect is on the distal condyles, the plate's lowest part.
  assert fc[:, 2].mean() < np.argwhere(labels == 2)[:, 2].mean()


def test_osteoarthritic_subject_is_the_same_knee_with_less_cartilage(subject):
  _, oa_tissue, _ = knee.make_tissues(3, SHAPE, SPACING, oa_fraction=1.0)
  labels, oa_labels = phantom.LABEL_OF_TISSUE[subject[1]], phantom.LABEL_OF_TISSUE[oa_tissue]
  for plate in (2, 4):
    assert 0.2 * (labels == plate).sum() < (oa_labels == plate).sum() < 0.85 * (labels == plate).sum()
  femur = (labels == 1).sum()
  assert abs(int((oa_labels == 1).sum()) - int(femur)) < 0.02 * femur  # the same knee: same draws apart
  np.testing.assert_array_equal(knee.make_tissues(3, SHAPE, SPACING, oa_fraction=0.0)[1], subject[1])
