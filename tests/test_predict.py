"""Prediction: masks in the input's voxel grid for any voxel order and in-plane size, exact reorientation,
label values, directories, and one-line errors."""

import nibabel as nib
import numpy as np
import pytest

from configs import tiny
from easunet_jax import predict, train
from easunet_jax.data import phantom
from easunet_jax.errors import CheckpointError, DataError

# Canonical axis i goes to axis ORNT[i, 0], flipped where ORNT[i, 1] = -1: the sagittal axis ends last and
# anterior-posterior runs backwards, as in many scanners' files.
ORNT = np.array([[2, 1], [0, -1], [1, 1]])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, canonical file, permuted file) of a trained tiny run and a phantom knee of another size and
  spacing (in-plane not a multiple of 16)."""
  root = tmp_path_factory.mktemp('predict')
  config = tiny.get_config()
  config.data.phantom_dir = str(root / 'phantom')
  train.train_and_evaluate(config, root / 'tiny')
  image, _, affine = phantom.make_subject(7, shape=(6, 40, 36), spacing=(3.0, 1.6, 1.8))
  canonical = root / 'canonical.nii.gz'
  nib.save(nib.Nifti1Image(image, affine), canonical)
  permuted = root / 'permuted.nii.gz'
  permuted_affine = affine @ nib.orientations.inv_ornt_aff(ORNT, image.shape)
  nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(image, ORNT), permuted_affine), permuted)
  return root / 'tiny', canonical, permuted


def _config(**predict_fields):
  config = tiny.get_config()
  config.predict.update(predict_fields)
  return config


def test_permuted_input_predicts_in_its_own_grid(run, tmp_path):
  workdir, _, permuted = run
  [result] = predict.predict(_config(), workdir, permuted, tmp_path / 'permuted_mask.nii.gz')
  source, mask = nib.load(permuted), nib.load(tmp_path / 'permuted_mask.nii.gz')
  assert mask.shape == source.shape == (40, 36, 6)
  np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
  assert mask.get_data_dtype() == np.uint8
  assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
  assert {'fc_volume_mm3', 'tc_volume_mm3', 'fc_thickness_mm', 'tc_thickness_mm'} <= set(result)



def test_reorientation_is_exact(run, tmp_path, monkeypatch):
  """With a stand-in network that thresholds the normalised image (the tiny run's masks may be empty), the
  permuted file's mask is the permuted canonical file's mask, voxel for voxel, through resampling and
  padding."""
  workdir, canonical, permuted = run

  def thresholds(self, image_SHW):
    del self
    return np.stack([image_SHW < 0.3, (image_SHW >= 0.3) & (image_SHW < 0.6), image_SHW >= 0.6], -1).astype(
        np.float32)

  monkeypatch.setattr(predict._Network, '__call__', thresholds)
  for path in (canonical, permuted):
    predict.predict(_config(), workdir, path, tmp_path / path.name)
  canonical_mask = np.asarray(nib.load(tmp_path / canonical.name).dataobj)
  assert len(np.unique(canonical_mask)) == 3
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / permuted.name).dataobj),
                                nib.orientations.apply_orientation(canonical_mask, ORNT))


def test_oai_zib_values_and_directory_in_directory_out(run, tmp_path):
  workdir, canonical, permuted = run
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for path in (canonical, permuted):
    (inputs / path.name).write_bytes(path.read_bytes())
  results = predict.predict(_config(label_values='oai-zib', tta=True), workdir, inputs, tmp_path / 'out')
  assert [r['output'] for r in results] == [str(tmp_path / 'out' / p.name) for p in (canonical, permuted)]
  for path in (canonical, permuted):
    mask = nib.load(tmp_path / 'out' / path.name)
    assert mask.shape == nib.load(path).shape
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 2, 4}


def _one_line_error(kind, match, *args) -> None:
  with pytest.raises(kind, match=match) as error:
    predict.predict(*args)
  assert '\n' not in str(error.value)


def test_errors_are_one_line(run, tmp_path):
  workdir, canonical, _ = run
  out = tmp_path / 'out.nii.gz'
  _one_line_error(DataError, 'no such input', _config(), workdir, tmp_path / 'absent.nii.gz', out)
  four_d = tmp_path / 'four_d.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
  _one_line_error(DataError, 'expected 3D', _config(), workdir, four_d, out)
  _one_line_error(CheckpointError, 'no checkpoint', _config(), tmp_path / 'untrained', canonical, out)
  assert not out.exists()


def test_small_components_are_dropped_per_class():
  classes = np.zeros((10, 40, 40), np.uint8)
  classes[2:8, 5:25, 5:10] = 1  # a plate: 6 x 20 x 5 voxels of 1 mm^3 = 600 mm^3
  classes[2:8, 30:35, 5:10] = 2  # a tibial plate of 150 mm^3
  classes[1, 36, 36] = 1  # specks on skin
  classes[9, 0:2, 0:2] = 2
  kept = predict.remove_small_components(classes, (1.0, 1.0, 1.0), 100.0)
  expected = classes.copy()
  expected[1, 36, 36] = 0
  expected[9, 0:2, 0:2] = 0
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(predict.remove_small_components(classes, (1.0, 1.0, 1.0), 0.0), classes)
  # Millimetres, not voxels: at 2 mm voxels the 150-voxel plate holds 1200 mm^3, the 4-voxel speck 32.
  assert (predict.remove_small_components(classes, (2.0, 2.0, 2.0), 100.0) == 2).sum() == 150
