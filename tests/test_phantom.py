"""Tests of the synthetic knee generator: labels, geometry in millimetres, determinism, dataset writing."""

import logging
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from easunet_jax import measures
from easunet_jax.data import knee, phantom, preprocess, volumes
from easunet_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]

SHAPE, SPACING = (16, 64, 64), (7.0, 1.0, 1.0)


@pytest.fixture(scope='module')
def subject():
  return phantom.make_subject(3, SHAPE, SPACING)


def test_labels_dtypes_and_affine(subject):
  image, labels, affine = subject
  assert image.shape == labels.shape == SHAPE
  assert image.dtype == np.float32 and labels.dtype == np.uint8
  assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
  assert nib.aff2axcodes(affine) == ('R', 'A', 'S')
  np.testing.assert_allclose(np.diag(affine)[:3], SPACING)
  np.testing.assert_allclose(affine[:3, :3] @ (np.array(SHAPE) - 1) / 2 + affine[:3, 3], 0, atol=1e-9)


def test_deterministic_and_varies_per_subject(subject):
  again = phantom.make_subject(3, SHAPE, SPACING)
  np.testing.assert_array_equal(again[0], subject[0])
  other = phantom.make_subject(4, SHAPE, SPACING)
  assert np.mean(other[1] != subject[1]) > 0.01


def test_anatomy_and_contrast(subject):
  image, labels, _ = subject
  z = np.arange(SHAPE[2])

  def centre_of(k):
    return (z * (labels == k).sum((0, 1))).sum() / (labels == k).sum()

  assert centre_of(1) > centre_of(2) > centre_of(4) > centre_of(3)  # femur, FC, TC, tibia from the top
  means = [image[labels == k].mean() for k in range(5)]
  assert means[2] > means[1] and means[4] > means[3]  # cartilage brighter than bone marrow
  # Cartilage lies on its bone, whose label holds the bone plate as OAI-ZIB's does: at these 1 mm pixels
  # and 7 mm slices, 44 % of FC's voxels and 71 % of TC's touch it (17 % and 45 % with the plate unlabelled).
  for plate, bone, share in ((2, 1, 0.3), (4, 3, 0.6)):
    assert np.mean(ndimage.binary_dilation(labels == bone)[labels == plate]) > share


def test_render_multiplies_the_bias_field_and_adds_rician_noise():
  """One tissue of intensity 2 without blur: the bias field's five coefficients each along its own axis (70 mm
  their scale, centred on the volume), and noise whose magnitude keeps the mean square at 4 + 2 sigma^2."""
  tissue = np.ones((5, 16, 24), np.uint8)
  intensity, spacing = np.array([0.0, 2.0]), (1.0, 2.0, 3.0)
  c = np.array([0.7, -0.4, 0.3, 0.5, -0.6])
  biased = phantom.render(tissue, intensity, spacing, np.random.default_rng(0), blur=0.0, bias=c, noise=0.0)
  x, y, z = ((np.arange(n) - (n - 1) / 2) * d / 70 for n, d in zip(tissue.shape, spacing))
  expected = (c[0] * x[:, None, None] + (c[1] * y + c[3] * y ** 2)[None, :, None]
              + (c[2] * z + c[4] * z ** 2)[None, None, :])
  np.testing.assert_allclose(np.log(biased / 2.0), expected, atol=1e-5)
  noisy = phantom.render(np.ones((8, 64, 64), np.uint8), intensity, spacing, np.random.default_rng(0),
                         blur=0.0, bias=np.zeros(5), noise=0.1)  # sigma 0.2
  assert np.mean(noisy ** 2) == pytest.approx(4.0 + 2 * 0.2 ** 2, abs=0.02)
  assert noisy.min() >= 0 and np.std(noisy) == pytest.approx(0.2, rel=0.1)


def test_cartilage_thickness_mm():
  # Fine sagittal pixels; thickness = vertical run of cartilage through the middle of each condyle.
  spacing = (2.0, 0.1, 0.1)
  for seed in range(3):
    _, labels, _ = phantom.make_subject(seed, (56, 40, 400), spacing)
    for k in (2, 4):
      runs = (labels[:, 20] == k).sum(axis=1) * spacing[2]  # column at the anterior-posterior centre
      runs = runs[runs > 0]
      assert 1.5 <= np.median(runs) <= 3.0, (seed, k, runs)
      assert runs.max() < 3.5


def test_joint_space_separates_cartilages():
  _, labels, _ = phantom.make_subject(0, (24, 160, 200), (3.0, 0.4, 0.1))
  z = np.arange(200)
  fc_low = np.where(labels == 2, z, 10 ** 6).min(2)
  tc_high = np.where(labels == 4, z, -1).max(2)
  both = (fc_low < 10 ** 6) & (tc_high >= 0)
  gap_mm = (fc_low - tc_high - 1)[both] * 0.1
  assert both.sum() > 100 and 0.4 <= gap_mm.min() <= 1.5


def test_demo_geometry_shows_cartilage_in_field_of_view():
  for seed in range(3):
    _, labels, _ = phantom.make_subject(seed, (32, 128, 128), (3.5, 0.5, 0.5))
    fc, tc = (labels == 2).any((1, 2)), (labels == 4).any((1, 2))
    assert np.count_nonzero(fc | tc) >= 18 and np.count_nonzero(fc & tc) >= 0.65 * np.count_nonzero(fc | tc)
    cartilage = np.isin(labels, (2, 4))
    assert not (cartilage[:, [0, -1]].any() or cartilage[:, :, [0, -1]].any())  # nothing cut by the border


def test_same_knee_at_other_spacing():
  # Millimetre anatomy: a coarser grid samples the same femoral cartilage volume.
  fine = phantom.make_subject(5, (16, 128, 128), (7.0, 0.5, 0.5))[1]
  coarse = phantom.make_subject(5, (16, 64, 64), (7.0, 1.0, 1.0))[1]
  v_fine, v_coarse = (fine == 2).sum() * 0.25, (coarse == 2).sum() * 1.0
  assert abs(v_fine - v_coarse) / v_fine < 0.15


def test_write_dataset_and_reuse(tmp_path, dead_mark):
  (tmp_path / 'images').mkdir()
  left = tmp_path / 'images' / (dead_mark('.') + 'phantom_000.nii.gz')  # a killed generation's half volume
  left.write_bytes(b'half')
  ids = phantom.write_dataset(tmp_path, 2, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
  assert not left.exists()
  assert ids == ['phantom_000', 'phantom_001']
  cases = volumes.discover_cases(tmp_path)
  assert [c.id for c in cases] == ids
  image, labels, spacing = volumes.load_case(cases[1], ((2, 1), (4, 2)))
  assert image.shape == (8, 32, 32) and set(np.unique(labels)) <= {0, 1, 2}
  np.testing.assert_allclose(spacing, (7.0, 2.0, 2.0))
  tissue = np.asarray(nib.load(tmp_path / 'tissues' / 'phantom_001.nii.gz').dataobj)
  np.testing.assert_array_equal(phantom.LABEL_OF_TISSUE[tissue], np.asarray(nib.load(cases[1].label).dataobj))
  assert {phantom.FAT, phantom.MUSCLE, phantom.FLUID} <= set(np.unique(tissue))
  first = np.asarray(nib.load(cases[0].label).dataobj)
  assert np.mean(first != np.asarray(nib.load(cases[1].label).dataobj)) > 0.01  # two knees, not one twice
  mtime = cases[0].image.stat().st_mtime_ns
  phantom.write_dataset(tmp_path, 2, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
  assert cases[0].image.stat().st_mtime_ns == mtime


def test_the_labels_of_the_tissues_are_oai_zibs():
  """Bone and its plate femur 1 / tibia 3, femoral cartilage 2, tibial 4; patellar cartilage, the patella
  and every soft tissue background."""
  bones = {phantom.FEMUR: 1, phantom.FEMUR_PLATE: 1, phantom.TIBIA: 3, phantom.TIBIA_PLATE: 3, phantom.FC: 2,
           phantom.TC: 4}
  assert phantom.LABEL_OF_TISSUE.tolist() == [bones.get(code, 0) for code in range(15)]


def test_write_dataset_says_when_its_folder_holds_more_subjects(tmp_path, caplog):
  phantom.write_dataset(tmp_path, 2, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
  with caplog.at_level(logging.WARNING):
    phantom.write_dataset(tmp_path, 2, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
    assert not caplog.records
    phantom.write_dataset(tmp_path, 1, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
  assert 'holds 2 phantom subjects, more than the 1 asked for' in caplog.text


def test_write_dataset_says_when_it_keeps_subjects_of_another_seed(tmp_path, caplog):
  phantom.write_dataset(tmp_path, 1, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
  mtime = (tmp_path / 'images' / 'phantom_000.nii.gz').stat().st_mtime_ns
  with caplog.at_level(logging.WARNING):
    phantom.write_dataset(tmp_path, 1, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)
    assert not caplog.records
    phantom.write_dataset(tmp_path, 1, (8, 32, 32), (7.0, 2.0, 2.0), seed=2)
  assert "'seed': 1" in caplog.text and "'seed': 2" in caplog.text and 'data.phantom_dir' in caplog.text
  assert (tmp_path / 'images' / 'phantom_000.nii.gz').stat().st_mtime_ns == mtime
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # the record of an earlier version names no generator
    phantom.write_dataset(tmp_path, 1, (8, 32, 32), (7.0, 2.0, 2.0), seed=1, made_by={'anatomy': 'schematic'})
    assert not caplog.records
  # More subjects of other settings would mix two kinds in one folder: refused, nothing written.
  with pytest.raises(DataError, match=r"holds phantoms made with .*'shape': \[8, 32, 32\].* not .*'shape': "
                     r'\[8, 16, 16\].*, and 1 more were asked for'):
    phantom.write_dataset(tmp_path, 2, (8, 16, 16), (7.0, 4.0, 4.0), seed=1)
  assert not (tmp_path / 'images' / 'phantom_001.nii.gz').exists()
  assert phantom.write_dataset(tmp_path, 2, (8, 32, 32), (7.0, 2.0, 2.0), seed=1)[1] == 'phantom_001'


def test_a_run_is_warned_of_a_phantom_folder_of_another_anatomy_or_fraction(tmp_path, caplog):
  data = default.get_config().data
  data.update(phantom_dir=str(tmp_path / 'phantoms'), phantom_num=1, phantom_shape=(8, 32, 32),
              phantom_spacing=(7.0, 2.0, 2.0))
  preprocess.resolve_data_root(data, tmp_path / 'run', seed=0)
  data.update(phantom_anatomy='reference', phantom_oa_fraction=1.0)
  with caplog.at_level(logging.WARNING):  # the folder's subject is kept: nothing is generated
    preprocess.resolve_data_root(data, tmp_path / 'run', seed=0)
  assert "'anatomy': 'schematic'}" in caplog.text
  assert "'anatomy': 'reference', 'oa_fraction': 1.0, 'elastic_mm': " in caplog.text


def test_write_dataset_in_worker_processes_matches_in_process(tmp_path):
  # Each subject's random numbers depend only on (seed, index): any worker count writes the same bytes.
  shape, spacing = (16, 48, 48), (7.0, 1.0, 1.0)
  ids = phantom.write_dataset(tmp_path / 'one', 3, shape, spacing, seed=7, workers=1)
  assert phantom.write_dataset(tmp_path / 'two', 3, shape, spacing, seed=7, workers=2) == ids
  for case_id in ids:
    for kind in ('images', 'labels', 'tissues'):
      one, two = (nib.load(tmp_path / d / kind / f'{case_id}.nii.gz') for d in ('one', 'two'))
      np.testing.assert_array_equal(one.get_fdata(), two.get_fdata())
      np.testing.assert_array_equal(one.affine, two.affine)
      assert (tmp_path / 'one' / kind / f'{case_id}.nii.gz').read_bytes() == (
          tmp_path / 'two' / kind / f'{case_id}.nii.gz').read_bytes()


def test_write_dataset_worker_error_reaches_the_caller(tmp_path):
  with pytest.raises(ValueError, match='at least one array'):  # no sagittal slice to generate
    phantom.write_dataset(tmp_path, 2, (0, 8, 8), (7.0, 2.0, 2.0), workers=2)
  assert not list(tmp_path.rglob('*.nii.gz'))


def _measures(labels, spacing):
  plates = {name: labels == value for name, value in volumes.OAI_ZIB_CARTILAGE.items()}
  return measures.cartilage_measures(plates, spacing)


def test_statistics_within_1_5x_of_the_reference_knee():
  # Every fourth sagittal slice of both, with that slice spacing: this samples the full-size statistics.
  labels, spacing = knee.reference()
  reference = _measures(labels[::4], (4 * spacing[0], *spacing[1:]))
  shape = (40, *phantom.DEFAULT_SHAPE[1:])
  coarse = (4 * phantom.DEFAULT_SPACING[0], *phantom.DEFAULT_SPACING[1:])
  subjects = [_measures(phantom.make_subject(phantom.subject_seed(0, i), shape, coarse)[1], coarse)
              for i in range(2)]
  # Per-slice statistics only: the volumes of every fourth slice are not comparable.
  for key in ('slices_with_cartilage', 'fc_share_pct', 'tc_share_pct', 'fc_thickness_mm', 'tc_thickness_mm'):
    want, got = reference[key], np.mean([s[key] for s in subjects])
    assert want / 1.5 <= got <= want * 1.5, (key, got, want)


def test_the_command_line_writes_the_subjects_asked_for_and_refuses_two_values(tmp_path):
  command = [sys.executable, '-m', 'easunet_jax.data.phantom', f'--out={tmp_path}', '--num=2',
             '--spacing=7,4,4']
  done = subprocess.run([*command, '--shape=4,16,16'], capture_output=True, text=True, check=False, cwd=REPO)
  assert done.returncode == 0 and done.stdout == f'2 phantom subjects in {tmp_path}\n', done.stderr[-2000:]
  assert [nib.load(p).shape for p in sorted((tmp_path / 'images').glob('*.nii.gz'))] == [(4, 16, 16)] * 2
  refused = subprocess.run([*command, '--shape=16,16'], capture_output=True, text=True, check=False, cwd=REPO)
  assert refused.returncode == 1 and 'three comma-separated values' in refused.stderr
