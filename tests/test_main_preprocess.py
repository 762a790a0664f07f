"""`main.py --mode=preprocess` on a real knee label map stored in two voxel orders and both folder layouts:
the store holds exactly the slices and per-slice cartilage counts that nibabel reads from the files."""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from easunet_jax.data import knee

ROOT = pathlib.Path(__file__).resolve().parents[1]
FC, TC = 2, 4  # OAI-ZIB labels; configs/eas.py maps them to classes 1 and 2


def _write(path: pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Two cases: the reference as stored (P, I, R: sagittal last) and the same knee as L, P, S (sagittal
  first, two axes flipped); images bright on cartilage, intermediate on bone, so alignment can be seen."""
  out = tmp_path_factory.mktemp('volumes')
  ref = nib.load(knee.REFERENCE)
  lps = ref.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(ref.affine),
                                                          nib.orientations.axcodes2ornt(('L', 'P', 'S'))))
  paths = {}
  for case_id, nii in (('knee_pir', ref), ('knee_lps', lps)):
    labels = np.asarray(nii.dataobj).astype(np.uint8)
    image = (100 + 300 * np.isin(labels, (1, 3)) + 1000 * np.isin(labels, (FC, TC))).astype(np.int16)
    paths[case_id] = (out / f'{case_id}_image.nii.gz', out / f'{case_id}_label.nii.gz')
    _write(paths[case_id][0], image, nii.affine)
    _write(paths[case_id][1], labels, nii.affine)
  assert nib.aff2axcodes(ref.affine) == ('P', 'I', 'R')
  return paths


def _expected(label_path: pathlib.Path) -> np.ndarray:
  """The file's training classes (FC 1, TC 2) in RAS order, (left to right, anterior, superior), as nibabel's
  own reorientation gives them."""
  labels = np.asarray(nib.as_closest_canonical(nib.load(label_path)).dataobj)
  return np.select([labels == FC, labels == TC], [1, 2], 0).astype(np.uint8)


@pytest.mark.parametrize('layout, train, val', [('nnunet', 'knee_pir', 'knee_lps'),
                                                ('images', 'knee_lps', 'knee_pir')])
def test_preprocess_cli_stores_the_files_slices_in_ras_order(files, tmp_path, layout, train, val):
  root = tmp_path / 'D'
  for case_id, (image, label) in files.items():
    names = ((f'imagesTr/{case_id}_0000.nii.gz', f'labelsTr/{case_id}.nii.gz') if layout == 'nnunet' else
             (f'images/{case_id}.nii.gz', f'labels/{case_id}.nii.gz'))
    for name, target in zip(names, (image, label)):
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).symlink_to(target)
  split_file = tmp_path / 'S.json'
  split_file.write_text(json.dumps({'train': [train], 'val': [val], 'test': []}))
  cache = tmp_path / 'C'
  run = subprocess.run([sys.executable, 'main.py', '--config=configs/eas.py', '--mode=preprocess',
                        f'--config.data.root={root}', f'--config.data.split_file={split_file}',
                        f'--config.data.cache_dir={cache}', f'--workdir={tmp_path / "run"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  for split, case_id in (('train', train), ('val', val)):
    images = np.load(cache / split / 'images.npy', mmap_mode='r')
    labels = np.load(cache / split / 'labels.npy', mmap_mode='r')
    index = json.loads((cache / split / 'index.json').read_text())
    expected = _expected(files[case_id][1])
    if split == 'train':  # the slices with cartilage only
      expected = expected[expected.any(axis=(1, 2))]
      assert len(expected) == 103  # the reference's sagittal slices with cartilage
    assert images.shape == labels.shape == (len(expected), 384, 384) and images.dtype == np.float16
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1, 2} and {row['case'] for row in index} == {case_id}
    # Image and labels stay aligned through reorientation: the image is brightest exactly on cartilage.
    np.testing.assert_array_equal(np.asarray(images) == 1, np.asarray(labels) > 0)
