"""Tests of volume discovery (NIfTI and NIfTI pairs, MetaImage, NRRD), canonical loading, consistency checks
and label remapping."""


import gzip
import json
import logging
import pathlib
import re
import shutil

import metaimage
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from configs import eas
from easunet_jax import predict
from easunet_jax.data import knee, volumes
from easunet_jax.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[1]

IDENTITY_MAP = ((1, 1), (2, 2), (3, 3), (4, 4))


def _write_pair(root, case_id, image, labels, affine, nnunet=False):
  image_name = f'imagesTr/{case_id}_0000.nii.gz' if nnunet else f'images/{case_id}.nii.gz'
  label_name = f'labelsTr/{case_id}.nii.gz' if nnunet else f'labels/{case_id}.nii.gz'
  volumes.save_volume(root / image_name, image, affine)
  volumes.save_volume(root / label_name, labels, affine)


def _small_case(rng):
  image = rng.normal(size=(4, 5, 6)).astype(np.float32)
  labels = rng.integers(0, 5, size=(4, 5, 6)).astype(np.uint8)
  return image, labels, np.diag([0.7, 0.4, 0.4, 1.0])


@pytest.mark.parametrize('nnunet', [False, True])
def test_discover_both_layouts_sorted_with_unlabelled_images(tmp_path, nnunet):
  image, labels, affine = _small_case(np.random.default_rng(0))
  for case_id in ('b', 'a', 'c'):
    _write_pair(tmp_path, case_id, image, labels, affine, nnunet)
  (tmp_path / ('labelsTr/c.nii.gz' if nnunet else 'labels/c.nii.gz')).unlink()
  (tmp_path / ('labelsTr/c.nii' if nnunet else 'labels/c.nii')).mkdir()  # a folder is no label file
  cases = volumes.discover_cases(tmp_path)
  assert [c.id for c in cases] == ['a', 'b', 'c'] and cases[2].label is None
  assert cases[0].image.name == ('a_0000.nii.gz' if nnunet else 'a.nii.gz')
  assert volumes.load_image(cases[2].image)[0].shape == (4, 5, 6)  # still predictable


@pytest.mark.parametrize('nnunet', [False, True])
def test_the_layout_read_is_the_one_that_holds_volumes(tmp_path, nnunet):
  """Empty folders of the other layout beside a filled one (an nnU-Net conversion begun in the same folder)
  are not read in its place; volumes in both layouts, label maps alone too, are an error."""
  image, labels, affine = _small_case(np.random.default_rng(0))
  for case_id in ('a', 'b', 'c'):
    _write_pair(tmp_path, case_id, image, labels, affine, nnunet)
  other = ('images', 'labels') if nnunet else ('imagesTr', 'labelsTr')
  for folder in other:
    (tmp_path / folder).mkdir()
  cases = volumes.discover_cases(tmp_path)
  assert [c.id for c in cases] == ['a', 'b', 'c'] and all(c.image and c.label for c in cases)
  volumes.save_volume(tmp_path / other[1] / 'a.nii.gz', labels, affine)
  with pytest.raises(DataError, match=r'volumes in both images/ \+ labels/ and imagesTr/ \+ labelsTr/; keep'):
    volumes.discover_cases(tmp_path)


@pytest.mark.parametrize('nnunet', [False, True])
@pytest.mark.parametrize('gone', ['images', 'labels'])
def test_a_layout_folder_that_is_a_broken_link_is_named(tmp_path, nnunet, gone):
  """An unmounted images/ would make the label maps a data set of their own (data.synth trains on them), an
  unmounted labels/ every case unlabelled."""
  image, labels, affine = _small_case(np.random.default_rng(2))
  _write_pair(tmp_path, 'a', image, labels, affine, nnunet)
  folder = tmp_path / (f'{gone}Tr' if nnunet else gone)
  shutil.rmtree(folder)
  folder.symlink_to(tmp_path / 'unmounted')
  with pytest.raises(DataError, match=f'{folder}: a broken link \\(to {tmp_path}/unmounted\\)$'):
    volumes.discover_cases(tmp_path)


@pytest.mark.parametrize('nnunet', [False, True])
def test_label_maps_without_images_are_cases_of_their_own(tmp_path, nnunet, caplog):
  """An empty image folder counts as none (label maps alone), and a label map beside images that has none
  of its own is a case with image None (for data.synth), not dropped. nnU-Net's imagesTs/ and labelsTs/
  are said to be unread, with the command that scores them."""
  image, labels, affine = _small_case(np.random.default_rng(1))
  for case_id in ('a', 'b'):
    _write_pair(tmp_path, case_id, image, labels, affine, nnunet)
  image_dir = tmp_path / ('imagesTr' if nnunet else 'images')
  for path in image_dir.iterdir():
    path.unlink()
  (tmp_path / 'labelsTs').mkdir()
  assert [(c.id, c.image) for c in volumes.discover_cases(tmp_path)] == [('a', None), ('b', None)]
  assert (': labelsTs/ not read; the test split is drawn from labelsTr/ (data.split), or named by '
          'data.split_file\n' in caplog.text) == nnunet
  caplog.clear()
  (tmp_path / 'imagesTs').mkdir()
  volumes.discover_cases(tmp_path)
  assert (f': imagesTs/ and labelsTs/ not read; the test split is drawn from labelsTr/ (data.split), or '
          f'named by data.split_file; to segment imagesTs/, add --mode=predict '
          f'--input={tmp_path / "imagesTs"} --output=<a folder>'
          f" --labels={tmp_path / 'labelsTs'} to this run's --config and --workdir\n"
          in caplog.text) == nnunet
  volumes.save_volume(image_dir / ('b_0000.nii.gz' if nnunet else 'b.nii.gz'), image, affine)
  assert [(c.id, c.image is None, c.label.name) for c in volumes.discover_cases(tmp_path)] == [
      ('a', True, 'a.nii.gz'), ('b', False, 'b.nii.gz')]


def test_a_case_in_two_files_is_an_error_and_misnamed_images_are_warned_of(tmp_path, caplog):
  image, labels, affine = _small_case(np.random.default_rng(8))
  _write_pair(tmp_path / 'twice', 'c0', image, labels, affine)
  volumes.save_volume(tmp_path / 'twice' / 'images' / 'c0.nii', image, affine)  # a decompressed copy
  with pytest.raises(DataError, match=r'case c0 comes as 2 files \(c0.nii, c0.nii.gz; 1 case\(s\) so\)'):
    volumes.discover_cases(tmp_path / 'twice')
  _write_pair(tmp_path / 'labels_twice', 'c0', image, labels, affine, nnunet=True)
  volumes.save_volume(tmp_path / 'labels_twice' / 'labelsTr' / 'c0.nii', labels, affine)  # a stale copy
  with pytest.raises(DataError, match=r'labelsTr: case c0 comes as 2 files \(c0.nii, c0.nii.gz; '):
    volumes.discover_cases(tmp_path / 'labels_twice')
  _write_pair(tmp_path / 'nnunet', 'k_1', image, labels, affine, nnunet=True)
  volumes.save_volume(tmp_path / 'nnunet' / 'imagesTr' / 'k_1_0001.nii.gz', image, affine)  # a second channel
  volumes.save_volume(tmp_path / 'nnunet' / 'imagesTr' / 'k_2.nii.gz', image, affine)  # no _0000
  assert [c.id for c in volumes.discover_cases(tmp_path / 'nnunet')] == ['k_1']
  assert '2 volume file(s) not named <id>_0000 ignored (other channels, or misnamed): k_1_0001.nii.gz, ' \
         'k_2.nii.gz' in caplog.text


def test_upper_case_suffixes_are_volumes_as_nibabel_and_itk_read_them(tmp_path):
  image, labels, affine = _small_case(np.random.default_rng(9))
  volumes.save_volume(tmp_path / 'images' / 'K1.NII.GZ', image, affine)
  volumes.save_volume(tmp_path / 'labels' / 'K1.NII', labels, affine)
  volumes.save_volume(tmp_path / 'images' / 'K2.nii.gz', image, affine)
  sitk.WriteImage(sitk.GetImageFromArray(labels.transpose(2, 1, 0)), str(tmp_path / 'labels' / 'K2.mha'))
  (tmp_path / 'labels' / 'K2.mha').rename(tmp_path / 'labels' / 'K2.MHA')  # ITK writes lower-case
  cases = volumes.discover_cases(tmp_path)
  assert [(c.id, c.image.name, c.label.name) for c in cases] == [('K1', 'K1.NII.GZ', 'K1.NII'),
                                                                 ('K2', 'K2.nii.gz', 'K2.MHA')]
  assert volumes.open_volume(cases[1].label).shape == (4, 5, 6)  # read as MetaImage, not by nibabel
  pairs, batch = predict._inputs(tmp_path / 'images', tmp_path / 'masks')
  assert batch and [(scan.name, mask.name) for scan, mask in pairs] == [('K1.NII.GZ', 'K1.nii.gz'),
                                                                       ('K2.nii.gz', 'K2.nii.gz')]
  scan, mask = tmp_path / 'images' / 'K1.NII.GZ', tmp_path / 'k1_mask.NII.GZ'
  assert predict._inputs(scan, mask)[0] == [(scan, mask)]  # a mask file, not a folder to write into
  found = predict._label_files(pairs, tmp_path / 'labels', batch)
  assert found == {scan: case.label for (scan, _), case in zip(pairs, cases)}


def test_discover_empty_root_is_one_line_error(tmp_path):
  (tmp_path / 'images').mkdir()
  with pytest.raises(DataError) as e:
    volumes.discover_cases(tmp_path)
  assert '\n' not in str(e.value) and 'images' in str(e.value)


def test_shape_and_affine_mismatch_are_one_line_errors(tmp_path):
  image, labels, affine = _small_case(np.random.default_rng(0))
  volumes.save_volume(tmp_path / 'images/x.nii.gz', image, affine)
  volumes.save_volume(tmp_path / 'labels/x.nii.gz', labels[:, :, :5], affine)
  posed = affine.copy()
  posed[:3, 3] = (60.0, -20.0, 15.0)
  volumes.save_volume(tmp_path / 'images/y.nii.gz', image, posed)
  shifted = posed.copy()
  shifted[0, 3] += 0.01
  volumes.save_volume(tmp_path / 'labels/y.nii.gz', labels, shifted)
  # The same grid stored in another voxel order (axes permuted and flipped, the affine with them) is no
  # mismatch: both are read in canonical order.
  ornt = np.array([[2, -1], [0, 1], [1, -1]])
  volumes.save_volume(tmp_path / 'images/z.nii.gz', image, affine)
  volumes.save_volume(tmp_path / 'labels/z.nii.gz', nib.orientations.apply_orientation(labels, ornt),
                      affine @ nib.orientations.inv_ornt_aff(ornt, labels.shape))
  # A scan with a pose and a label map without one, as OAI-ZIB's beside images converted from OAI's DICOM.
  volumes.save_volume(tmp_path / 'images/w.nii.gz', image, posed)
  volumes.save_volume(tmp_path / 'labels/w.nii.gz', labels, affine)
  # A label map of other voxel sizes (resampled elsewhere, its shape kept): off by many mm at the far side.
  volumes.save_volume(tmp_path / 'images/v.nii.gz', image, np.diag([2.0, 0.5, 0.5, 1.0]))
  volumes.save_volume(tmp_path / 'labels/v.nii.gz', labels, np.diag([2.0, 0.4, 0.4, 1.0]))
  # One sagittal slice, of other thickness: no voxel centre moves.
  volumes.save_volume(tmp_path / 'images/u.nii.gz', image[:1], np.diag([3.0, 0.5, 0.5, 1.0]))
  volumes.save_volume(tmp_path / 'labels/u.nii.gz', labels[:1], np.diag([1.0, 0.5, 0.5, 1.0]))
  cases = {c.id: c for c in volumes.discover_cases(tmp_path)}
  with pytest.raises(DataError, match=r'^u: image and label map affines differ by 2 \(more than 0.001\); '
                     r'voxels of 3 x 0.5 x 0.5 and 1 x 0.5 x 0.5 mm: '):
    volumes.load_case(cases['u'], IDENTITY_MAP)
  far = 0.1 * np.hypot(*(n - 1 for n in image.shape[1:]))
  with pytest.raises(DataError, match=rf'^v: image and label map grids place a voxel up to {far:.3g} mm '
                     r'apart \(affines differ by more than 0.001 mm\); voxels of 2 x 0.5 x 0.5 and '
                     r'2 x 0.4 x 0.4 mm: '):
    volumes.load_case(cases['v'], IDENTITY_MAP)
  with pytest.raises(DataError, match=r'^y: image and label map grids place a voxel up to 0.01 mm apart '
                     r'\(affines differ by more than 0.001 mm\): '):
    volumes.load_case(cases['y'], IDENTITY_MAP)
  for case_id, word in (('x', 'shape'), ('y', 'affine'), ('w', 'affine')):
    with pytest.raises(DataError) as e:
      volumes.load_case(cases[case_id], IDENTITY_MAP)
    assert '\n' not in str(e.value) and case_id in str(e.value) and word in str(e.value)
    # Only one of the two files without a pose is a hint: x's have none, y's both.
    assert ('no pose' in str(e.value)) == ('the label map has no pose' in str(e.value)) == (case_id == 'w')
  expected = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, affine)).dataobj)
  np.testing.assert_array_equal(volumes.load_case(cases['z'], IDENTITY_MAP)[1], expected)


def test_an_image_of_few_values_is_warned_of_as_a_label_map_in_place_of_the_scan(tmp_path, caplog):
  image, labels, affine = _small_case(np.random.default_rng(1))
  _write_pair(tmp_path / 'scan', 'k', image, labels, affine)
  _write_pair(tmp_path / 'mask', 'k', labels.astype(np.float32), labels, affine)
  for root in ('scan', 'mask'):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      volumes.load_case(volumes.discover_cases(tmp_path / root)[0], IDENTITY_MAP)
    warned = [r.getMessage() for r in caplog.records if 'distinct values' in r.getMessage()]
    assert len(warned) == (root == 'mask')
  assert warned[0].startswith(f'k: image {tmp_path / "mask" / "images" / "k.nii.gz"} holds only 5 distinct '
                              'values (0, 1, 2, 3, 4): a label map or mask in place of the scan?')


def test_non_integer_labels_rejected(tmp_path):
  image, _, affine = _small_case(np.random.default_rng(0))
  _write_pair(tmp_path, 'f', image, image + 0.5, affine)
  with pytest.raises(DataError, match='non-integer'):
    volumes.load_case(volumes.discover_cases(tmp_path)[0], IDENTITY_MAP)


@pytest.mark.parametrize('value', [-1, 5, 255, 256, 1000])
def test_label_values_outside_the_label_map_are_one_line_errors(tmp_path, value):
  _, labels, affine = _small_case(np.random.default_rng(0))
  labels = labels.astype(np.int16)
  labels[0, 0, 0] = value
  volumes.save_volume(tmp_path / 'k.nii.gz', labels, affine)
  # A fix data.label_map can make (its sources are 0-255), else the file's.
  fix = (r'add each to data.label_map with its class, 0 \(background\), 1 \(femoral\) or 2 \(tibial '
         r"cartilage\), as the data set names it: OAIZIB-CM's lateral tibial cartilage 5 as "
         r"data.label_map='\(\(2, 1\), \(4, 2\), \(5, 2\)\)', a meniscus or patellar cartilage as class 0"
         if 0 <= value <= 255 else
         'data.label_map maps values 0-255: rewrite the file with its labels in that range')
  with pytest.raises(DataError, match=rf'k: label file \S+ holds values \[{value}\] outside data.label_map '
                     rf'\(known: .*; {fix}'):
    volumes.load_labels(volumes.Case('k', None, tmp_path / 'k.nii.gz'), IDENTITY_MAP)


def test_colour_complex_and_cartilage_free_label_maps_are_one_line_errors(tmp_path):
  """A label map of RGB or complex voxels is refused as one; scoring against one without the values
  data.label_map makes cartilage (a binary mask read with OAI-ZIB's map) is refused, not scored 0."""
  image, labels, affine = _small_case(np.random.default_rng(0))
  nii = nib.Nifti1Image(image, affine)
  rgb = np.zeros(labels.shape, [('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
  for name, voxels, message in (('rgb', rgb, 'holds R/G/B colour voxels'),
                                ('complex', labels.astype(np.complex64), 'holds complex voxels'),
                                ('binary', (labels > 0).astype(np.uint8),
                                 r'holds none of the values data.label_map makes cartilage \(2, 4\)')):
    nib.save(nib.Nifti1Image(voxels, affine), tmp_path / f'{name}.nii.gz')
    with pytest.raises(DataError, match=message):
      volumes.labels_on_grid(nii, volumes.Case(name, None, tmp_path / f'{name}.nii.gz'), ((2, 1), (4, 2)))


def test_non_finite_or_huge_label_values_and_vector_voxels_are_named(tmp_path):
  """A float label map holding inf or 1e20 (not a wrapped int64 after a cast warning); a NIfTI of vector
  (RGB) voxels; a scan with NaN voxels says what to do."""
  image, labels, affine = _small_case(np.random.default_rng(0))
  for value, message in ((np.inf, 'holds NaN or infinite values'), (1e20, r'holds values as far as 1e\+20'),
                         (-1e20, 'holds values as far as -1e\\+20')):
    voxels = labels.astype(np.float32)
    voxels[0, 0, 0] = value
    nib.save(nib.Nifti1Image(voxels, affine), tmp_path / 'k.nii.gz')
    with pytest.raises(DataError, match=rf'^k: label file \S+ {message} \(expected'):
      volumes.load_labels(volumes.Case('k', None, tmp_path / 'k.nii.gz'), ((2, 1), (4, 2)))
  vector = nib.Nifti1Image(np.zeros((*image.shape, 1, 3), np.uint8), affine)
  vector.header.set_intent('vector')
  nib.save(vector, tmp_path / 'rgb.nii.gz')
  with pytest.raises(DataError, match=r'rgb.nii.gz: vector voxels of 3 components \(shape \(4, 5, 6, 1, '
                     r'3\)\), expected a greyscale scan or label map: save one component$'):
    volumes.load_image(tmp_path / 'rgb.nii.gz')
  image[0, 0, 0] = np.nan
  nib.save(nib.Nifti1Image(image, affine), tmp_path / 'nan.nii.gz')
  with pytest.raises(DataError, match=r'nan.nii.gz: image holds 1 NaN or infinite voxels; replace them '
                     r'\(e.g. by 0\) and run again$'):
    volumes.load_image(tmp_path / 'nan.nii.gz')


def test_remap_labels():
  labels = np.array([[0, 1, 2, 3, 4, 5, 7]])
  out = volumes.remap_labels(labels, ((2, 1), (4, 2), (5, 2)))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, [[0, 0, 1, 0, 2, 2, 0]])


def test_permuted_and_flipped_affine_loads_to_same_canonical_array(tmp_path):
  rng = np.random.default_rng(1)
  image, labels, affine = _small_case(rng)
  _write_pair(tmp_path / 'ras', 'k', image, labels, affine)
  # The same voxels stored as (P, I, R): axes permuted (2, 0, 1 -> file order) and two of them flipped.
  stored_image = np.flip(np.transpose(image, (1, 2, 0)), (0, 1))
  stored_labels = np.flip(np.transpose(labels, (1, 2, 0)), (0, 1))
  pir = np.array([[0, 0, 0.7, 0], [-0.4, 0, 0, 0.4 * 4], [0, -0.4, 0, 0.4 * 5], [0, 0, 0, 1]])
  assert nib.aff2axcodes(pir) == ('P', 'I', 'R')
  _write_pair(tmp_path / 'pir', 'k', stored_image, stored_labels, pir)
  ref = volumes.load_case(volumes.discover_cases(tmp_path / 'ras')[0], IDENTITY_MAP)
  got = volumes.load_case(volumes.discover_cases(tmp_path / 'pir')[0], IDENTITY_MAP)
  np.testing.assert_array_equal(got[0], ref[0])
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_allclose(got[2], (0.7, 0.4, 0.4))


@pytest.mark.parametrize('first_axis', [0.7, -0.7])  # stored in RAS order, and left-right flipped
def test_voxel_sizes_are_the_affines_where_pixdim_disagrees(tmp_path, first_axis):
  """A file whose sform (the affine nibabel reads) says 0.7 x 0.4 x 0.4 mm and whose pixdim, with no qform,
  says 1 mm: the spacing is the sform's, whether or not the voxels are reordered into RAS."""
  nii = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), np.float32),
                        np.diag([first_axis, 0.4, 0.4, 1.0]))
  nii.set_qform(None, code=0)
  nii.header['pixdim'][1:4] = 1.0
  nib.save(nii, tmp_path / 'scan.nii.gz')
  assert nib.load(tmp_path / 'scan.nii.gz').header.get_zooms() == (1.0, 1.0, 1.0)
  np.testing.assert_allclose(volumes.load_image(tmp_path / 'scan.nii.gz')[1], (0.7, 0.4, 0.4))


@pytest.mark.parametrize('sform', [False, True])
@pytest.mark.parametrize('name', ['scan.nii.gz', 'scan.hdr', 'misnamed.nii'])
def test_a_voxel_size_of_0_read_as_1_mm_is_warned_of_without_a_sform(tmp_path, caplog, sform, name):
  """pixdim 0.5 x 0 x 2 with only a qform: nibabel and ITK read 0.5 x 1 x 2 mm, and the user is told; with a
  sform of 0.5 x 0.4 x 2 mm, the sform's spacing is read and nothing said."""
  nii = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), np.float32), np.diag([0.5, 0.4, 2.0, 1.0]))
  if not sform:
    nii.set_sform(None, code=0)
  header_file = tmp_path / ('scan.hdr' if name == 'scan.hdr' else 'scan.nii')
  nib.save(nii, header_file)  # it writes pixdim from the affine: the 0 is written into the bytes
  header = bytearray(header_file.read_bytes())
  header[84:88] = np.float32(0.0).tobytes()  # pixdim[2], the second axis's voxel size
  header_file.write_bytes(header)
  if name != header_file.name:  # gzipped, as .nii.gz, and as .nii (misnamed: read whole from its bytes)
    (tmp_path / name).write_bytes(gzip.compress(header_file.read_bytes()))
  with caplog.at_level(logging.WARNING):
    spacing = volumes.load_image(tmp_path / name)[1]
  np.testing.assert_allclose(spacing, (0.5, 0.4, 2.0) if sform else (0.5, 1.0, 2.0))
  if not sform:
    np.testing.assert_allclose(sitk.ReadImage(str(header_file)).GetSpacing(),
                               spacing)
  assert (f'{name}: its header gives voxel sizes 0.5 x 0 x 2 (pixdim) and no sform: 0 is read as 1 mm'
          in caplog.text) != sform


@pytest.mark.parametrize('name', ['scan.nii', 'misnamed.nii.gz'])
def test_a_negative_voxel_size_is_warned_of_as_itk_reads_it_as_a_flip(tmp_path, caplog, name):
  """pixdim -0.5 x 0.4 x 2 beside a qform alone: nibabel reads 0.5 mm, ITK a flip of the first axis, and the
  user is told that the two disagree."""
  nii = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), np.float32), np.diag([0.5, 0.4, 2.0, 1.0]))
  nii.set_sform(None, code=0)
  nib.save(nii, tmp_path / 'scan.nii')
  header = bytearray((tmp_path / 'scan.nii').read_bytes())
  header[80:84] = np.float32(-0.5).tobytes()  # pixdim[1], the first axis's voxel size
  (tmp_path / 'scan.nii').write_bytes(header)
  if name != 'scan.nii':  # uncompressed under a .nii.gz name: read whole from its bytes
    (tmp_path / 'scan.nii').rename(tmp_path / name)
  with caplog.at_level(logging.WARNING):
    spacing = volumes.load_image(tmp_path / name)[1]
  np.testing.assert_allclose(spacing, (0.5, 0.4, 2.0))
  assert f'{name}: its header gives negative voxel sizes -0.5 x 0.4 x 2 (pixdim)' in caplog.text
  if name == 'scan.nii':
    assert sitk.ReadImage(str(tmp_path / name)).GetDirection()[0] == -1.0  # ITK's reading: flipped


@pytest.mark.parametrize('unit, per_mm', [('meter', 0.001), ('micron', 1000.0), ('mm', 1.0)])
def test_a_header_in_metres_or_microns_is_read_in_mm_as_itk_reads_it(tmp_path, unit, per_mm):
  """A knee centred 50 mm to the right, of 0.7 x 0.4 x 0.4 mm voxels, its affine in the header's unit."""
  affine = np.diag([0.7, 0.4, 0.4, 1.0])
  affine[:3, 3] = (50.0 - 0.7 * 1.5, 0.0, 0.0)  # the centre of 4 voxels along x at 50 mm
  nii = nib.Nifti1Image(np.random.default_rng(0).random((4, 5, 6), np.float32),
                        np.diag([per_mm] * 3 + [1.0]) @ affine)
  nii.header.set_xyzt_units(unit, 'sec')  # a time unit too (4D writers set one): its bits are not space's
  nib.save(nii, tmp_path / 'scan.nii.gz')
  spacing = volumes.load_image(tmp_path / 'scan.nii.gz')[1]
  np.testing.assert_allclose(spacing, (0.7, 0.4, 0.4), rtol=1e-6)
  np.testing.assert_allclose(spacing, sitk.ReadImage(str(tmp_path / 'scan.nii.gz')).GetSpacing(), rtol=1e-6)
  side, why = predict.decide_laterality(volumes.open_volume(tmp_path / 'scan.nii.gz'), {}, None)
  assert side == 'R' and why.startswith("from the position: centred 50 mm to the patient's right")
  labels = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), affine)  # the same grid, in mm
  nib.save(labels, tmp_path / 'labels.nii.gz')
  volumes.check_headers(volumes.Case('k', tmp_path / 'scan.nii.gz', tmp_path / 'labels.nii.gz'))
  if unit == 'micron':  # millimetre values under the micron's code: voxels of 0.0007 mm, said so
    nii = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), affine)
    nii.header.set_xyzt_units(unit)
    nib.save(nii, tmp_path / 'mislabelled.nii.gz')
    with pytest.raises(DataError, match=r'in microns as its header says \(voxels of 0.0007 x 0.0004 x 0.0004 '
                                        r'mm\)'):
      volumes.open_volume(tmp_path / 'mislabelled.nii.gz')


def test_trailing_axes_of_one_are_a_3d_volume_and_more_volumes_an_error(tmp_path):
  image, labels, affine = _small_case(np.random.default_rng(2))
  _write_pair(tmp_path, 'k', image, labels, affine)
  # The image as (x, y, z, 1, 1), the label map 3D.
  nib.save(nib.Nifti1Image(image[..., None, None], affine), tmp_path / 'images' / 'k.nii.gz')
  got = volumes.load_case(volumes.discover_cases(tmp_path)[0], IDENTITY_MAP)
  np.testing.assert_array_equal(got[0], image)
  np.testing.assert_array_equal(got[1], labels)
  nib.save(nib.Nifti1Image(np.stack([image, image], -1), affine), tmp_path / 'echoes.nii.gz')
  with pytest.raises(DataError, match=r'4D volume of shape \(4, 5, 6, 2\), expected 3D \(a series') as e:
    volumes.load_image(tmp_path / 'echoes.nii.gz')
  assert '\n' not in str(e.value)


def test_complex_voxels_load_as_their_magnitude(tmp_path):
  image, _, affine = _small_case(np.random.default_rng(3))
  phase = np.exp(1j * np.random.default_rng(4).uniform(-np.pi, np.pi, image.shape))
  nib.save(nib.Nifti1Image((np.abs(image) * phase).astype(np.complex64), affine), tmp_path / 'complex.nii.gz')
  got, _ = volumes.load_image(tmp_path / 'complex.nii.gz')
  np.testing.assert_allclose(got, np.abs(image), rtol=1e-6)
  # MetaImage has no complex type: ITK writes (and reads back) two channels, which are named as such.
  sitk.WriteImage(sitk.GetImageFromArray(image * phase.astype(np.complex64)), tmp_path / 'complex.mha')
  with pytest.raises(DataError, match=r"2 channels per voxel, expected 1 .*a complex scan's two parts"):
    volumes.load_image(tmp_path / 'complex.mha')


def test_colour_empty_axis_and_nonstandard_units_headers(tmp_path):
  """RGB voxels and an axis of no voxels are one-line errors; a time unit outside the standard's codes
  beside mm (xyzt_units 58, which nibabel's get_xyzt_units refuses) reads as mm."""
  image, _, affine = _small_case(np.random.default_rng(5))
  rgb = np.zeros(image.shape, [('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
  nib.save(nib.Nifti1Image(rgb, affine), tmp_path / 'rgb.nii.gz')
  with pytest.raises(DataError, match='R/G/B colour voxels, expected a greyscale scan'):
    volumes.load_image(tmp_path / 'rgb.nii.gz')
  nib.save(nib.Nifti1Image(image[:, :, :0], affine), tmp_path / 'empty.nii.gz')
  with pytest.raises(DataError, match=r'volume of shape \(4, 5, 0\), an axis without voxels'):
    volumes.load_image(tmp_path / 'empty.nii.gz')
  nii = nib.Nifti1Image(image, affine)
  nii.header['xyzt_units'] = 58
  nib.save(nii, tmp_path / 'units.nii.gz')
  assert volumes.mm_per_unit(nib.load(tmp_path / 'units.nii.gz')) == 1.0
  np.testing.assert_array_equal(volumes.load_image(tmp_path / 'units.nii.gz')[0], image)


def test_a_saved_volume_gives_its_orientation_in_both_qform_and_sform(tmp_path):
  # Code 1 (scanner) in both: ITK reads the qform, nibabel and FSL the sform; a code of 0 is no orientation.
  affine = np.array([[0, 0, -0.7, 50], [-0.36, 0, 0, 20], [0, 0.36, 0, -10], [0, 0, 0, 1]])
  volumes.save_volume(tmp_path / 'mask.nii.gz', np.zeros((2, 3, 4), np.uint8), affine)
  nii = nib.load(tmp_path / 'mask.nii.gz')
  assert nii.header['qform_code'] == nii.header['sform_code'] == 1
  np.testing.assert_allclose(nii.get_qform(), affine, atol=1e-6)
  np.testing.assert_allclose(nii.get_sform(), affine, atol=1e-6)
  assert nii.get_data_dtype() == np.uint8


def test_reference_knee_orientation():
  case = volumes.Case('ref', knee.REFERENCE, knee.REFERENCE)
  _, labels, spacing = volumes.load_case(case, IDENTITY_MAP)
  assert labels.shape == (160, 384, 384)  # sagittal (left-right) axis first
  np.testing.assert_allclose(spacing, (0.7, 0.3646, 0.3646), atol=1e-3)
  assert np.count_nonzero(labels == 2) == 127_311 and np.count_nonzero(labels == 4) == 40_467
  # Superior is axis 2 upwards: the femur lies above the tibia.
  z = np.arange(384)
  def height(k):
    return (z * (labels == k).sum((0, 1))).sum() / (labels == k).sum()

  assert height(1) > height(3)
  cartilage_slices = np.count_nonzero((labels == 2).any((1, 2)) | (labels == 4).any((1, 2)))
  assert 95 <= cartilage_slices <= 110


@pytest.mark.parametrize('kind', ['mhd', 'mha', 'big-endian', 'nrrd', 'nhdr'])
def test_metaimage_and_nrrd_load_as_the_same_volume_in_nifti(tmp_path, kind):
  """ITK's LPS pose read into RAS: the same canonical voxels and spacing as the NIfTI file of that pose."""
  image, _, _ = _small_case(np.random.default_rng(5))
  image = (image * 100).astype(np.int16)
  ras = np.array([[0, 0, 0.7, -3], [-0.4, 0, 0, 20], [0, -0.4, 0, 30], [0, 0, 0, 1]])  # (P, I, R)
  volumes.save_volume(tmp_path / 'k.nii.gz', image, ras)
  path = tmp_path / f"k.{kind if kind in ('mha', 'nrrd', 'nhdr') else 'mhd'}"
  metaimage.write(path, image, ras)
  if kind == 'big-endian':  # as other writers may store the voxels; ITK writes little-endian
    path.write_text(path.read_text().replace('ByteOrderMSB = False', 'ByteOrderMSB = True'))
    raw = tmp_path / 'k.raw'
    raw.write_bytes(np.frombuffer(raw.read_bytes(), '<i2').astype('>i2').tobytes())
  np.testing.assert_allclose(volumes.open_volume(path).affine, ras, atol=1e-6)
  got, want = volumes.load_image(path), volumes.load_image(tmp_path / 'k.nii.gz')
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1])


@pytest.mark.parametrize('field, value, message', [
    ('ElementSpacing', '0 0.6 0.6', 'degenerate voxel-to-world affine'),
    ('TransformMatrix', '0 0 0 0 0 0 0 0 0', 'degenerate voxel-to-world affine'),
    ('ElementSpacing', '0.6 0.6', '3 axes, and 2 spacings, 3 origin coordinates and 9 direction numbers'),
    ('Offset', '0 0', '3 axes, and 3 spacings, 2 origin coordinates and 9 direction numbers'),
    ('TransformMatrix', '1 0 0 1', '3 axes, and 3 spacings, 3 origin coordinates and 4 direction numbers'),
    ('space directions', '(0,0,0) (0,0.6,0) (0,0,0.6)', 'degenerate voxel-to-world affine'),
    ('space directions', '(nan,0,0) (0,0.6,0) (0,0,0.6)', 'degenerate voxel-to-world affine'),
    ('space directions', '(1,0) (0,0.6) (0,0)', r'directions or spacings of shape \(2, 3\)'),
    ('space origin', '(0,0)', '2 origin coordinates'),
])
def test_a_metaimage_or_nrrd_header_of_broken_geometry_is_one_line(tmp_path, field, value, message):
  image, _, affine = _small_case(np.random.default_rng(5))
  path = tmp_path / ('k.nhdr' if field.startswith('space') else 'k.mhd')
  metaimage.write(path, image, affine)
  lines = path.read_text().splitlines()
  separator = ': ' if path.suffix == '.nhdr' else ' = '
  [line] = [i for i, text in enumerate(lines) if text.lower().startswith(field.lower())]
  lines[line] = f'{field}{separator}{value}'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=f'{path.name}: .*{message}'):
    volumes.load_image(path)


def test_a_metaimage_header_with_more_spacings_than_axes_reads_as_itk_reads_it(tmp_path):
  """ITK reads the first NDims numbers of ElementSpacing and Offset, and ignores the rest."""
  image, _, affine = _small_case(np.random.default_rng(5))
  path = tmp_path / 'k.mhd'
  metaimage.write(path, image, affine)
  expected = volumes.open_volume(path).affine
  lines = [f'{line} 1' if line.startswith(('ElementSpacing', 'Offset')) else line
           for line in path.read_text().splitlines()]
  path.write_text('\n'.join(lines) + '\n')
  np.testing.assert_allclose(volumes.open_volume(path).affine, expected)
  np.testing.assert_allclose(sitk.ReadImage(str(path)).GetSpacing(), np.linalg.norm(affine[:3, :3], axis=0))


def test_a_header_claiming_more_voxels_than_memory_holds_is_one_line(tmp_path, monkeypatch):
  """A corrupt header's shape (4 TB of float32 voxels in a file of a few bytes): one line, however the
  machine's memory refuses it (at the allocation, or at the short read); refused at the allocation, it
  gives the voxels' size (4 bytes each)."""
  nii = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
  nii.header.set_data_shape((32000, 32000, 1000))
  path = tmp_path / 'huge.nii'
  path.write_bytes(nii.header.binaryblock + bytes(4 + 32))
  with pytest.raises(DataError, match=r'huge.nii: (its header gives a shape of .* GiB of voxels, more than '
                                      r'memory holds|voxel data unreadable, truncated or corrupt)'):
    volumes.load_image(path)

  def no_memory(*args, **kwargs):
    raise MemoryError
  monkeypatch.setattr(np, 'asarray', no_memory)  # read_canonical's read: the allocation refused
  with pytest.raises(DataError, match=r'shape of \(32000, 32000, 1000\), 3.81e\+03 GiB of voxels'):
    volumes.read_canonical(volumes.open_volume(path), path)


def test_nifti_pairs_and_misnamed_compression_load_as_the_nifti_file(tmp_path, capfd, caplog):
  """A NIfTI pair (.hdr + .img, any case) is discovered and read as the .nii.gz of its voxels; an uncompressed
  file named .nii.gz and a gzipped one named .nii are read by their content, as ITK reads them; an Analyze
  7.5 .hdr (no orientation) and a truncated misnamed file are one-line errors."""
  image, labels, affine = _small_case(np.random.default_rng(8))
  volumes.save_volume(tmp_path / 'k.nii.gz', image, affine)
  for kind, array in (('images', image), ('labels', labels)):
    (tmp_path / 'pairs' / kind).mkdir(parents=True)
    nib.save(nib.Nifti1Pair(array, affine), tmp_path / 'pairs' / kind / 'k.hdr')
  images = tmp_path / 'pairs' / 'images'
  for suffix in ('hdr', 'img'):
    (images / f'k.{suffix}').rename(images / f'k.{suffix.upper()}')
  [case] = volumes.discover_cases(tmp_path / 'pairs')
  assert case == volumes.Case('k', images / 'k.HDR', tmp_path / 'pairs' / 'labels' / 'k.hdr')
  assert volumes.data_file(case.image) == images / 'k.IMG'
  want = volumes.load_image(tmp_path / 'k.nii.gz')
  raw = gzip.decompress((tmp_path / 'k.nii.gz').read_bytes())
  (tmp_path / 'plain.nii.gz').write_bytes(raw)
  (tmp_path / 'zipped.nii').write_bytes((tmp_path / 'k.nii.gz').read_bytes())
  nib.save(nib.Nifti2Image(image, affine), tmp_path / 'k2.nii.gz')
  (tmp_path / 'zipped2.nii').write_bytes((tmp_path / 'k2.nii.gz').read_bytes())  # NIfTI-2, gzipped too
  for path in (case.image, tmp_path / 'plain.nii.gz', tmp_path / 'zipped.nii', tmp_path / 'zipped2.nii'):
    got = volumes.load_image(path)
    np.testing.assert_array_equal(got[0], want[0], err_msg=path.name)
    np.testing.assert_allclose(got[1], want[1], err_msg=path.name)
  np.testing.assert_array_equal(volumes.load_case(case, IDENTITY_MAP)[1], labels)
  nib.save(nib.AnalyzeImage(image, affine), tmp_path / 'analyze.hdr')
  (tmp_path / 'cut.nii.gz').write_bytes(raw[:200])
  (tmp_path / 'noise.nii.gz').write_bytes(np.random.default_rng(0).bytes(5000))
  capfd.readouterr()
  for path, message in (('analyze.hdr', 'an Analyze 7.5 header, without an orientation: convert it to NIfTI'),
                        ('cut.nii.gz', 'not a readable NIfTI file'),
                        ('noise.nii.gz', 'not a readable NIfTI file')):
    with pytest.raises(DataError, match=message) as error:
      volumes.load_image(tmp_path / path)
    assert '\n' not in str(error.value)
  # The one-line error alone: nibabel's header checks of the noise ("sizeof_hdr should be 348") stay silent.
  assert not capfd.readouterr().err and not caplog.records


def _by_itk(path) -> tuple[np.ndarray, np.ndarray]:
  """(voxels indexed (x, y, z), RAS affine) of a file as SimpleITK reads it."""
  image = sitk.ReadImage(str(path))
  lps = np.eye(4)
  lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing()
  lps[:3, 3] = image.GetOrigin()
  return sitk.GetArrayFromImage(image).T, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def test_files_other_writers_make_load_as_itk_reads_them(tmp_path):
  """64-bit integer voxels (numpy's default integer, as SimpleITK writes it), MetaIO's 4-byte MET_LONG, a
  MetaImage header giving ElementSize but no ElementSpacing, a NRRD file naming no space (ITK's LPS), NRRD's
  big-endian voxels, `line skip`, `byte skip` (of compressed data) and the LAS space by either name, and a
  MetaImage's HeaderSize -1 (the voxels are the data file's last bytes)."""
  labels = np.random.default_rng(7).integers(0, 5, size=(4, 5, 6))
  paths = [tmp_path / 'int64.mha', tmp_path / 'int64.nrrd']
  for path in paths:
    sitk.WriteImage(sitk.GetImageFromArray(labels.T), str(path))
  header = ('ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n'
            'DimSize = 4 5 6\n')
  voxels = labels.astype('<i4').tobytes(order='F')
  for name, fields in (('long.mha', 'ElementSpacing = 0.7 0.4 0.4\nElementType = MET_LONG\n'),
                       ('size.mha', 'ElementSize = 0.7 0.4 0.4\nElementType = MET_INT\n')):
    paths.append(tmp_path / name)
    paths[-1].write_bytes(f'{header}{fields}ElementDataFile = LOCAL\n'.encode() + voxels)
  paths.append(tmp_path / 'no_space.nrrd')
  paths[-1].write_bytes(b'NRRD0004\ntype: int\ndimension: 3\nsizes: 4 5 6\nendian: little\nencoding: raw\n'
                        b'space dimension: 3\nspace directions: (0.7,0,0) (0,0.4,0) (0,0,0.4)\n'
                        b'space origin: (10,20,30)\n\n' + voxels)

  def nrrd(name, fields, data, space='left-posterior-superior'):
    paths.append(tmp_path / name)
    paths[-1].write_bytes(f'NRRD0004\ntype: short\ndimension: 3\nspace: {space}\nsizes: 4 5 6\n'
                          'space directions: (0.7,0,0) (0,0.4,0) (0,0,0.4)\nspace origin: (10,20,30)\n'
                          f'{fields}'.encode() + data)

  shorts = labels.astype('<i2').tobytes(order='F')
  nrrd('big.nrrd', 'endian: big\nencoding: raw\n\n', labels.astype('>i2').tobytes(order='F'))
  nrrd('byte_skip.nrrd', 'endian: little\nencoding: gzip\nbyte skip: 3\n\n', gzip.compress(b'abc' + shorts))
  (tmp_path / 'lines.raw').write_bytes(b'a line\nanother\n' + shorts)
  nrrd('line_skip.nhdr', 'endian: little\nencoding: raw\nline skip: 2\ndata file: lines.raw\n', b'')
  # Lines skipped after a header in the same file: those that follow it, before the data (compressed or not).
  nrrd('line_skip.nrrd', 'endian: little\nencoding: raw\nline skip: 1\n\n', b'a line\n' + shorts)
  nrrd('line_skip_gz.nrrd', 'endian: little\nencoding: gzip\nline skip: 1\n\n',
       b'a line\n' + gzip.compress(shorts))
  for space in ('LAS', 'left-anterior-superior'):
    nrrd(f'{space}.nrrd', 'endian: little\nencoding: raw\n\n', shorts, space)
  (tmp_path / 'tail.raw').write_bytes(b'0123456789' + shorts)
  paths.append(tmp_path / 'tail.mhd')
  paths[-1].write_text(f'{header}ElementSpacing = 0.7 0.4 0.4\nElementType = MET_SHORT\nHeaderSize = -1\n'
                       'ElementDataFile = tail.raw\n')
  for path in paths:
    nii, (itk_voxels, itk_affine) = volumes.open_volume(path), _by_itk(path)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), labels, err_msg=path.name)
    np.testing.assert_array_equal(itk_voxels, labels, err_msg=path.name)
    np.testing.assert_allclose(nii.affine, itk_affine, atol=1e-6, err_msg=path.name)
  assert volumes.open_volume(tmp_path / 'size.mha').header.get_zooms() == pytest.approx((0.7, 0.4, 0.4))


def test_oai_zib_release_of_label_maps_is_discovered(tmp_path):
  """OAI-ZIB's download: segmentation/segmentation_masks/<id>.segmentation_masks.mhd + .raw, label maps
  alone; data.root may be the download's top folder or its segmentation/ folder."""
  _, labels, _ = _small_case(np.random.default_rng(6))
  for case_id in ('9002', '9001'):
    metaimage.write(tmp_path / 'segmentation' / 'segmentation_masks' / f'{case_id}.segmentation_masks.mhd',
                    labels, spacing=(0.7, 0.36, 0.36))
  (tmp_path / 'classification' / 'segmentation_masks').mkdir(parents=True)  # bone labels only: refused
  assert volumes.discover_cases(tmp_path) == volumes.discover_cases(tmp_path / 'segmentation')
  with pytest.raises(DataError, match=r"classification/ masks label bones only \(1 femur, 2 tibia"):
    volumes.discover_cases(tmp_path / 'classification')
  cases = volumes.discover_cases(tmp_path)
  assert [(c.id, c.image) for c in cases] == [('9001', None), ('9002', None)]
  got, spacing = volumes.load_labels(cases[0], IDENTITY_MAP)
  # No pose: the voxel axes are ITK's L, P, S, so canonical RAS flips the first two.
  np.testing.assert_array_equal(got, labels[::-1, ::-1])
  np.testing.assert_allclose(spacing, (0.7, 0.36, 0.36))
  raw = tmp_path / 'segmentation' / 'segmentation_masks' / '9001.segmentation_masks.raw'
  raw.write_bytes(raw.read_bytes()[:50])
  assert volumes.open_volume(cases[0].label).shape == labels.shape  # headers alone: voxels not read
  with pytest.raises(DataError, match=r'9001.segmentation_masks.mhd: voxel data unreadable, truncated'):
    volumes.load_labels(cases[0], IDENTITY_MAP)


def test_a_mask_of_this_tools_own_values_given_as_labels_is_warned_of(tmp_path, caplog):
  """FC 1 and TC 2 (predict's default mask values) read with OAI-ZIB's label map are femur and FC, and no
  TC: a warning names the label map that reads them."""
  image, _, affine = _small_case(np.random.default_rng(9))
  mask = np.zeros(image.shape, np.uint8)
  mask[1, 1:3, 1:3], mask[2, 2:4, 2:4] = 1, 2
  _write_pair(tmp_path, 'k', image, mask, affine)
  [case] = volumes.discover_cases(tmp_path)
  with caplog.at_level(logging.WARNING):
    volumes.load_labels(case, ((2, 1), (4, 2)))
  assert 'holds only the values 0, 1 and 2, and data.label_map ((2, 1), (4, 2)) reads none as TC' in (
      caplog.text)
  # The flags that read it so also where predict runs the shipped model, which takes no --config.* alone.
  assert (f"(predict with the shipped model: --config={REPO / 'configs' / 'eas.py'}:knee "
          f'--weights={REPO / "easunet_jax" / "weights" / "eas_knee.npz"} --config.data.label_map=...)'
          ) in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    volumes.load_labels(case, ((1, 1), (2, 2)))
  assert not caplog.records
  _write_pair(tmp_path / 'femur', 'k', image, np.minimum(mask, 1), affine)  # 0 and 1 only: a bone, say
  with caplog.at_level(logging.WARNING):
    volumes.load_labels(volumes.discover_cases(tmp_path / 'femur')[0], ((2, 1), (4, 2)))
  assert not caplog.records


def test_dataset_json_names_that_disagree_with_the_label_map_are_refused(tmp_path, caplog):
  """nnU-Net's dataset.json (v2 {name: value}, v1 {value: name}) that names a label femoral or tibial
  cartilage which data.label_map leaves out or makes another class is a one-line error giving a map that
  follows the names, and one naming another label that the map does not read (its cases would be skipped)
  a warning giving it; names it cannot read, region lists, extra classes the map reads and other tools'
  JSON say nothing, and the map suggested keeps the given pairs of names it cannot read or that name
  cartilage of another kind."""
  def check(labels, label_map=((2, 1), (4, 2))):
    (tmp_path / 'dataset.json').write_text(json.dumps({'labels': labels, 'file_ending': '.nii.gz'}))
    volumes.check_dataset_json(tmp_path, label_map)

  volumes.check_dataset_json(tmp_path, ((2, 1), (4, 2)))  # none
  check({'background': 0, 'femur': 1, 'femoral_cartilage': 2, 'tibia': 3, 'tibial_cartilage': 4})
  check({'0': 'background', '1': 'Femur', '2': 'Femoral Cartilage', '3': 'Tibia', '4': 'Tibial Cartilage'})
  check({'background': 0, 'label_a': 1, 'label_b': 2})
  check({'background': 0, 'femorotibial cartilage': 1, 'FC': 2, 'TC': 4})  # both plates: neither class
  check({'background': 0, 'femur': 1, 'femoral cartilage': 2, 'tibia': 3, 'medial tibial cartilage': 4,
         'lateral tibial cartilage': 5}, ((2, 1), (4, 2), (5, 2)))
  check({'background': 0, 'femoral cartilage': 2, 'tibial cartilage': [4, 5]}, ((2, 1), (4, 2), (5, 2)))
  check({'background': 0, 'FemCart': 2, 'TibCart': 4, 'patellar cartilage': 5}, ((2, 1), (4, 2), (5, 3)))
  # 4, the file's tibia, read as background.
  with pytest.raises(ConfigError, match=r"^\S+dataset.json names label 1 'femoral_cartilage', class 1 \(1 "
                     r"femoral, 2 tibial cartilage\), and data.label_map leaves it out: pass "
                     r"--config.data.label_map='\(\(1, 1\), \(2, 2\), \(4, 0\)\)' \(predict with the "
                     r"shipped model: --config=\S+:knee --weights=\S+ --config.data.label_map=...\)$"):
    check({'background': 0, 'femoral_cartilage': 1, 'tibial_cartilage': 2, 'femur': 3, 'tibia': 4})
  with pytest.raises(ConfigError, match=r"label 5 'LTC', class 2 .* makes it class 1: .*label_map="
                     r"'\(\(2, 1\), \(4, 2\), \(5, 2\)\)'"):
    check({'background': 0, 'femur': 1, 'FC': 2, 'tibia': 3, 'MTC': 4, 'LTC': 5}, ((2, 1), (4, 2), (5, 1)))
  with pytest.raises(ConfigError, match=r"names label 1 'femoral_cartilage', .* leaves it out: pass "
                     r"--config.data.label_map='\(\(1, 1\), \(2, 2\), \(4, 2\)\)' "):  # v1's {value: name}
    check({'0': 'background', '1': 'femoral_cartilage', '2': 'tibial_cartilage', '3': 'femur'})
  with pytest.raises(ConfigError, match=r"label_map='\(\(1, 1\), \(2, 0\), \(4, 0\)\)'"):
    check({'background': 0, 'femoral cart': 1, 'femur': 2, 'tibia': 4})
  with pytest.raises(ConfigError, match=r"label_map='\(\(1, 1\),\)'"):  # one pair: a tuple all the same
    check({'background': 0, 'femoral cart': 1}, ((1, 2),))
  # SKM-TEA's labels: its menisci become background, also where the given map has them, and the map
  # suggested reads every value of its label maps (patellar cartilage 1 as OAI-ZIB's femur: background).
  skm_tea = {'background': 0, 'patellar cartilage': 1, 'femoral cartilage': 2, 'medial tibial cartilage': 3,
             'lateral tibial cartilage': 4, 'medial meniscus': 5, 'lateral meniscus': 6}
  for given in (((2, 1), (4, 2)), ((2, 1), (4, 2), (5, 0), (6, 0))):
    with pytest.raises(ConfigError, match=re.escape("label_map='((2, 1), (3, 2), (4, 2), (5, 0), (6, 0))'")):
      check(skm_tea, given)
  check(skm_tea, ((2, 1), (3, 2), (4, 2), (5, 0), (6, 0)))
  # Menisci and patellar cartilage beside OAI-ZIB's labels, which the default map does not read: warned of
  # (a workdir trained with the map goes on with it), with the map that reads them.
  assert not caplog.records
  with caplog.at_level(logging.WARNING):
    check({'background': 0, 'femur': 1, 'femoral cartilage': 2, 'tibia': 3, 'tibial cartilage': 4,
           'meniscus': 5, 'patellar cartilage': 6})
  assert ("names label 5 'meniscus', which data.label_map ((2, 1), (4, 2)) does not read: a case holding it "
          'is skipped (in training) or unscored (by predict --labels); to read it as background, pass '
          "--config.data.label_map='((2, 1), (4, 2), (5, 0), (6, 0))' (predict with the shipped model: "
          f'{eas.SHIPPED_FLAGS} --config.data.label_map=...)') in caplog.text
  caplog.clear()
  check({'background': 0, 'femoral cartilage': 2, 'tibial cartilage': 4, 'meniscus': 5,
         'patellar cartilage': 6}, ((2, 1), (4, 2), (5, 0), (6, 0)))
  check({'background': 0, 'label_5': 5}, ((2, 1), (4, 2), (5, 2)))
  assert not caplog.records
  # A tissue the file names that the map reads as cartilage: OAI-ZIB's tibia as TC, a meniscus as TC.
  with pytest.raises(ConfigError, match=re.escape(
      "names label 3 'tibia', no cartilage, and data.label_map makes it class 2 (1 femoral, 2 tibial "
      "cartilage): pass --config.data.label_map='((2, 1), (3, 0), (4, 2))'")):
    check({'background': 0, 'femur': 1, 'femoral cartilage': 2, 'tibia': 3, 'tibial cartilage': 4},
          ((2, 1), (3, 2), (4, 2)))
  with pytest.raises(ConfigError, match=r"names label 5 'meniscus', no cartilage, .* makes it class 2"):
    check({'femoral cartilage': 2, 'tibial cartilage': 4, 'meniscus': 5}, ((2, 1), (4, 2), (5, 2)))
  # Names it cannot read (another language), and patellar cartilage joined to the femoral plate on purpose:
  # their given pairs stay in the map suggested.
  with caplog.at_level(logging.WARNING):
    check({'Hintergrund': 0, 'Femurknorpel': 2, 'Tibiaknorpel': 4, 'Meniskus': 5})
  assert "label_map='((2, 1), (4, 2), (5, 0))'" in caplog.text
  with pytest.raises(ConfigError, match=re.escape("label_map='((2, 1), (3, 2), (4, 2), (5, 1), (6, 0))'")):
    check({'femoral cartilage': 2, 'TC': 3, 'patellar cartilage': 5, 'meniscus': 6}, ((2, 1), (4, 2), (5, 1)))
  # Saved with a byte-order mark, as Windows editors do: read all the same.
  bom = b'\xef\xbb\xbf'
  (tmp_path / 'dataset.json').write_bytes(bom + json.dumps({'labels': {'femoral_cartilage': 1}}).encode())
  with pytest.raises(ConfigError, match="names label 1 'femoral_cartilage'"):
    volumes.check_dataset_json(tmp_path, ((2, 1), (4, 2)))
  for other in ([{'image': 'a.nii.gz'}], {'labels': ['background', 'femur']}, {'labels': None}):
    (tmp_path / 'dataset.json').write_text(json.dumps(other))
    volumes.check_dataset_json(tmp_path, ((2, 1), (4, 2)))


def _noise() -> np.ndarray:
  return np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)


def test_a_metaimage_giving_its_byte_order_as_element_byte_order_msb_alone(tmp_path):
  """MetaIO's older field name ElementByteOrderMSB, without BinaryDataByteOrderMSB: big-endian voxels."""
  image = (_noise() * 100).astype(np.int16)
  path = tmp_path / 'k.mhd'
  metaimage.write(path, image, np.diag([0.7, 0.4, 0.4, 1.0]))
  lines = [line for line in path.read_text().splitlines() if 'ByteOrderMSB' not in line]
  lines.insert(-1, 'ElementByteOrderMSB = True')  # before ElementDataFile, the header's last field
  path.write_text('\n'.join(lines) + '\n')
  raw = tmp_path / 'k.raw'
  raw.write_bytes(np.frombuffer(raw.read_bytes(), '<i2').astype('>i2').tobytes())
  np.testing.assert_array_equal(volumes.load_image(path)[0], image)


def test_a_nifti_suffix_in_mixed_case_is_read_as_its_own_file(tmp_path):
  """nibabel lowers a suffix of mixed case (.Nii.gz) and opens that name: "no such file", or the other file
  where both are there. Such a file is read by its content."""
  image = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
  nib.save(nib.Nifti1Image(image, np.diag([2.0, 1.0, 1.0, 1.0])), tmp_path / 'k.nii.gz')
  (tmp_path / 'k.nii.gz').rename(tmp_path / 'k.Nii.gz')
  nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), np.eye(4)), tmp_path / 'k.nii.gz')
  nii = volumes.open_volume(tmp_path / 'k.Nii.gz')
  np.testing.assert_array_equal(np.asarray(nii.dataobj), image)
  assert nii.affine[0, 0] == 2.0
  # Cut short, it is named so.
  whole = (tmp_path / 'k.Nii.gz').read_bytes()
  (tmp_path / 'k.Nii.gz').write_bytes(whole[:len(whole) // 2])
  with pytest.raises(DataError, match=r'k.Nii.gz: not a readable NIfTI file \(Compressed file ended before'):
    volumes.open_volume(tmp_path / 'k.Nii.gz')
