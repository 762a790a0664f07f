"""Tests of reading a DICOM series: geometry, voxel order and values against SimpleITK, series choice, and
the one-line errors of broken series."""

import logging
import shutil

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import AXIAL, CORONAL, OBLIQUE, SAGITTAL, STEPS, ds_numbers, write_enhanced, write_series
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from easunet_jax.data import dicom
from easunet_jax.errors import DataError


def _simpleitk(folder, tmp_path):
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
  sitk.WriteImage(reader.Execute(), str(tmp_path / 'x.nii.gz'))
  return nib.load(tmp_path / 'x.nii.gz')


@pytest.mark.parametrize('knee_x', [60.0, -60.0])
@pytest.mark.parametrize('cosines, offsets', [(SAGITTAL, STEPS), (AXIAL, STEPS), (CORONAL, STEPS),
                                              (OBLIQUE, STEPS), (SAGITTAL, -STEPS)],
                         ids=['sagittal', 'axial', 'coronal', 'oblique', 'descending'])
def test_matches_simpleitk(tmp_path, cosines, offsets, knee_x):
  write_series(tmp_path / 'dcm', cosines, (knee_x, -20.0, 30.0), offsets=offsets, slope=1.5, intercept=-10)
  nii, _ = dicom.read_series(tmp_path / 'dcm')
  reference = _simpleitk(tmp_path / 'dcm', tmp_path)
  assert nii.shape == reference.shape == (24, 20, 8)
  np.testing.assert_allclose(nii.affine, reference.affine, atol=1e-3)
  np.testing.assert_allclose(nii.get_fdata(), reference.get_fdata(), rtol=1e-6)
  assert nii.get_data_dtype() == np.float32 and nii.header['qform_code'] == nii.header['sform_code'] == 1


@pytest.mark.parametrize('syntax', [JPEG2000Lossless, RLELossless], ids=['jpeg2000', 'rle'])
def test_compressed_series_reads_like_the_uncompressed(tmp_path, syntax):
  write_series(tmp_path / 'dcm', size=(64, 48))  # JPEG 2000's default resolution levels need 32+ pixels
  plain, _ = dicom.read_series(tmp_path / 'dcm')
  for path in (tmp_path / 'dcm').iterdir():
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(path)
  assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
  compressed, _ = dicom.read_series(tmp_path / 'dcm')
  np.testing.assert_array_equal(compressed.get_fdata(), plain.get_fdata())


@pytest.mark.parametrize('file_meta, first', [(False, None), (False, ''), (True, None)],
                         ids=['bare-implicit', 'bare-implicit-empty-first', 'meta-explicit'])
def test_files_without_preamble_read_like_the_others(tmp_path, file_meta, first):
  # Data sets stored without the 128-byte preamble and 'DICM' (PACS and ACR-NEMA-style exports): bare, in
  # implicit VR (its first element empty, or not), or starting at their file meta.
  write_series(tmp_path / 'dcm')
  plain, _ = dicom.read_series(tmp_path / 'dcm')
  for path in (tmp_path / 'dcm').iterdir():
    ds = pydicom.dcmread(path)
    ds.preamble = None
    if not file_meta:
      del ds.file_meta
    if first is not None:
      ds.SpecificCharacterSet = first
    pydicom.dcmwrite(path, ds, implicit_vr=not file_meta)
  assert path.read_bytes()[:2] == (b'\x02\x00' if file_meta else b'\x08\x00')
  assert first is None or path.read_bytes()[2:8] == b'\x05\x00\x00\x00\x00\x00'  # (0008,0005), empty
  assert dicom.is_dicom_folder(tmp_path / 'dcm')
  bare, _ = dicom.read_series(tmp_path / 'dcm')
  np.testing.assert_array_equal(bare.get_fdata(), plain.get_fdata())
  np.testing.assert_array_equal(bare.affine, plain.affine)


def test_voxel_order_rescale_per_slice_and_report(tmp_path):
  def per_slice(n, ds):
    ds.RescaleIntercept = str(10 * n)
    ds.ImageLaterality = 'R'
  raw, uid = write_series(tmp_path, AXIAL, (-60.0, 5.0, 30.0), slope=0.5, edit=per_slice)
  nii, report = dicom.read_series(tmp_path)
  np.testing.assert_allclose(nii.get_fdata(), raw * 0.5 + 10 * np.arange(8), rtol=1e-6)
  # Axial LPS (column, row, slice) steps along (+x, +y, +z) are RAS (-x, -y, +z); the origin's x and y flip.
  np.testing.assert_allclose(nii.affine, [[-0.4, 0, 0, 60], [0, -0.5, 0, -5], [0, 0, 0.7, 30], [0, 0, 0, 1]],
                             atol=1e-6)
  assert report['laterality'] == 'R' and report['series_used'] == uid and report['manufacturer'] == 'ACME'
  assert report['laterality_from'] == 'the DICOM ImageLaterality tag'
  assert report['description'] == 'DESS 8' and report['slice_spacing_mm'] == pytest.approx(0.7)
  assert report['series_found'] == [{'name': uid, 'description': 'DESS 8', 'number': 3, 'slices': 8}]


@pytest.mark.parametrize('slope, shown', [('NaN', 'nan'), ('1e36', r'1e\+36')])
def test_a_rescale_slope_giving_no_float32_values_is_named(tmp_path, slope, shown):
  """Not blamed on the voxels ('image holds NaN or infinite voxels'), with no overflow warning."""
  def bad_slope(n, ds):
    ds.RescaleSlope = slope
  write_series(tmp_path, edit=bad_slope)
  with pytest.raises(DataError, match=rf'RescaleSlope {shown} and RescaleIntercept 0 give values '
                     r'that are not finite or beyond float32 \(3.4e38\)$'):
    dicom.read_series(tmp_path)


def test_sheared_stack_keeps_slice_positions(tmp_path):
  def shear(n, ds):
    # Each slice also 0.2 mm posterior of the one before.
    ds.ImagePositionPatient = ds_numbers([60 - 0.7 * n, -20 + 0.2 * n, 30])
  write_series(tmp_path, edit=shear)
  nii, report = dicom.read_series(tmp_path)
  # Voxel (0, 0, k) lies on slice k's position (RAS); SimpleITK would use the normal times the mean distance.
  corners = nii.affine @ np.stack([np.zeros(8), np.zeros(8), np.arange(8), np.ones(8)])
  np.testing.assert_allclose(corners[:3].T, [[-60 + 0.7 * n, 20 - 0.2 * n, 30] for n in range(8)], atol=1e-6)
  assert report['slice_spacing_mm'] == pytest.approx(np.hypot(0.7, 0.2))


def test_two_series_choice_and_unknown_uid(tmp_path):
  _, large = write_series(tmp_path / 'a', laterality='L')
  _, small = write_series(tmp_path / 'b', CORONAL, offsets=STEPS[:6], seed=1)
  assert dicom.is_dicom_folder(tmp_path) and [s.uid for s in dicom.find_series(tmp_path)] == [large, small]
  nii, report = dicom.read_series(tmp_path)
  assert nii.shape[2] == 8 and report['series_used'] == large and report['laterality'] == 'L'
  nii, report = dicom.read_series(tmp_path, small)
  assert nii.shape[2] == 6 and report['series_used'] == small and report['laterality'] is None
  with pytest.raises(DataError, match=r'no series 1\.2\.3;') as e:
    dicom.read_series(tmp_path, '1.2.3')
  assert large in str(e.value) and small in str(e.value) and '6 slices' in str(e.value)
  # An echo of a series of one echo, as '<uid>:<echo>' names one of a multi-echo series.
  with pytest.raises(DataError, match=rf'series {small} holds one echo, which --series names by its UID '
                     rf'alone: --series={small}$'):
    dicom.read_series(tmp_path, f'{small}:1')


def test_series_of_as_many_slices_are_taken_in_series_number_order(tmp_path, caplog):
  """The first by SeriesNumber, warned of: a study's DESS of both knees has two series of one size."""
  def number(value):
    def edit(n, ds):
      ds.SeriesNumber = value
    return edit

  _, later = write_series(tmp_path / 'a', edit=number(5))
  _, first = write_series(tmp_path / 'b', edit=number(2), seed=1)
  assert [(s.number, s.uid) for s in dicom.find_series(tmp_path)] == [(2, first), (5, later)]
  with caplog.at_level(logging.WARNING):
    assert dicom.read_series(tmp_path)[1]['series_used'] == first
  assert (f"2 series of 8 slices: {first} ('DESS 8', 8 slices) used (the lowest SeriesNumber), not {later}"
          in caplog.text)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    dicom.read_series(tmp_path, later)
  assert not caplog.text


def test_series_of_several_patients_are_refused_unless_one_is_picked(tmp_path):
  """A folder of two patients' studies (OAI's release folder): which knee of whom would be arbitrary."""
  def patient(name):
    def edit(n, ds):
      ds.PatientID = name
    return edit

  _, uid = write_series(tmp_path / '9000099', edit=patient('9000099'))
  write_series(tmp_path / '9000296', edit=patient('9000296'), seed=1)
  with pytest.raises(DataError, match=r"DICOM series of 2 patients \(9000099, 9000296\): give each patient's "
                     'folder as a scan'):
    dicom.read_series(tmp_path)
  assert dicom.read_series(tmp_path, uid)[1]['series_used'] == uid
  assert dicom.read_series(tmp_path / '9000099')[1]['series_used'] == uid
  # Enhanced (multi-frame) files: each frame's header keeps its file's PatientID.
  rng = np.random.default_rng(0)
  for seed, name in enumerate(('9000099', '9000296')):
    path = tmp_path / 'enhanced' / name / 'IM1'
    write_enhanced(path, [rng.integers(0, 4000, (24, 20, 8), dtype=np.uint16)], seed=seed)
    ds = pydicom.dcmread(path)
    ds.PatientID = name
    ds.save_as(path)
  with pytest.raises(DataError, match=r"DICOM series of 2 patients \(9000099, 9000296\)"):
    dicom.read_series(tmp_path / 'enhanced')


@pytest.mark.parametrize('signed', [False, True])
def test_monochrome1_is_turned_round_as_simpleitk_reads_it(tmp_path, signed):
  """Values stored to be shown inverted (the lowest white) read as MONOCHROME2's, turned round within the
  range of the 12 bits stored (signed: -2048..2047)."""
  def inverted(n, ds):
    ds.PhotometricInterpretation, ds.BitsStored, ds.HighBit = 'MONOCHROME1', 12, 11
    ds.PixelRepresentation = int(signed)
    if signed:
      ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16).astype(np.int16) - 2048).tobytes()
  raw, _ = write_series(tmp_path, edit=inverted)
  stored = raw.astype(np.int64) - 2048 * signed
  expected = (-1 if signed else 4095) - stored
  nii, _ = dicom.read_series(tmp_path)
  np.testing.assert_array_equal(nii.get_fdata(), expected)
  if signed:  # GDCM reads no signed 12-bit values stored in 16 bits
    return
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
  itk = sitk.GetArrayFromImage(reader.Execute())  # (slice, row, column)
  np.testing.assert_array_equal(np.sort(itk.ravel()), np.sort(expected.ravel()))


@pytest.mark.parametrize('description, side', [
    ('SAG_3D_DESS_RIGHT', 'R'), ('SAG_IW_TSE_LEFT', 'L'), ('Knee Lt PD', 'L'), ('RT KNEE 3D DESS', 'R'),
    ('DESS R', None), ('LEFT vs RIGHT', None), ('SAG_3D_DESS_WE', None)])
def test_a_series_description_names_the_side_where_no_tag_does(tmp_path, description, side):
  def describe(n, ds):
    ds.SeriesDescription = description
  write_series(tmp_path / 'plain', edit=describe)
  report = dicom.read_series(tmp_path / 'plain')[1]
  assert report['laterality'] == side
  assert report['laterality_from'] == (f"the series description '{description}'" if side else None)
  write_series(tmp_path / 'tagged', laterality='L', edit=describe)  # the tag wins
  report = dicom.read_series(tmp_path / 'tagged')[1]
  assert (report['laterality'], report['laterality_from']) == ('L', 'the DICOM Laterality tag')


def _echo(number):
  def edit(n, ds):
    ds.EchoNumbers = number
  return edit


def test_echoes_of_one_series_are_volumes_of_their_own(tmp_path):
  first, uid = write_series(tmp_path, edit=_echo(1))
  second, _ = write_series(tmp_path, uid=uid, edit=_echo(2), seed=1)  # same slice positions, other values
  assert [s.name for s in dicom.find_series(tmp_path)] == [f'{uid}:1', f'{uid}:2']
  for series, expected in ((None, first), (uid, first), (f'{uid}:1', first), (f'{uid}:2', second)):
    nii, report = dicom.read_series(tmp_path, series)
    np.testing.assert_array_equal(nii.get_fdata(), expected)
    assert report['series_used'] == f'{uid}:{1 + (expected is second)}'
  with pytest.raises(DataError, match=f'no series {uid}:3; found {uid}:1 .* {uid}:2 '):
    dicom.read_series(tmp_path, f'{uid}:3')
  one_echo, single = write_series(tmp_path / 'one', edit=_echo(1))  # one echo number: a plain series
  assert [s.name for s in dicom.find_series(tmp_path / 'one')] == [single]
  np.testing.assert_array_equal(dicom.read_series(tmp_path / 'one')[0].get_fdata(), one_echo)


@pytest.mark.parametrize('cosines, offsets', [(SAGITTAL, STEPS), (OBLIQUE, -STEPS)],
                         ids=['sagittal', 'oblique-descending'])
def test_enhanced_echoes_match_dcm2niix(tmp_path, cosines, offsets):
  """One multi-frame file of two echoes, frames shuffled: each echo is the volume dcm2niix writes for it (the
  reference converter of enhanced files; SimpleITK reads them as 2D frames), in the world's voxel order."""
  rng = np.random.default_rng(0)
  echoes = [rng.integers(0, 4000, (24, 20, 8), dtype=np.uint16) for _ in range(2)]
  uid = write_enhanced(tmp_path / 'dcm' / 'IM1', echoes, cosines, offsets=offsets, slope=1.5, intercept=-10,
                       laterality='L')
  dcm2niix.main(['-z', 'y', '-f', 'x', '-o', str(tmp_path), str(tmp_path / 'dcm')], capture_output=True,
                check=True)
  assert [s.name for s in dicom.find_series(tmp_path / 'dcm')] == [f'{uid}:1', f'{uid}:2']
  for echo in (1, 2):
    nii, report = dicom.read_series(tmp_path / 'dcm', f'{uid}:{echo}')
    reference = nib.as_closest_canonical(nib.load(tmp_path / f'x_e{echo}.nii.gz'))
    ours = nib.as_closest_canonical(nii)
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(ours.get_fdata(), reference.get_fdata())
  assert report['series_found'][0]['slices'] == 8 and report['laterality'] == 'L'


def test_enhanced_echoes_in_a_file_each_are_the_volumes_of_one_file(tmp_path):
  """A multi-echo series exported as one enhanced file per echo: the same two volumes as the file of both."""
  rng = np.random.default_rng(2)
  echoes = [rng.integers(0, 4000, (24, 20, 8), dtype=np.uint16) for _ in range(2)]
  both = write_enhanced(tmp_path / 'both' / 'IM1', echoes)

  def second_echo(echo, n, groups):
    groups.MREchoSequence[0].EffectiveEchoTime = 10.0

  uid = write_enhanced(tmp_path / 'each' / 'IM1', echoes[:1])
  write_enhanced(tmp_path / 'each' / 'IM2', echoes[1:], uid=uid, edit=second_echo, seed=1)
  assert [s.name for s in dicom.find_series(tmp_path / 'each')] == [f'{uid}:1', f'{uid}:2']
  for echo in (1, 2):
    ours, reference = (dicom.read_series(tmp_path / folder, f'{series}:{echo}')[0]
                       for folder, series in (('each', uid), ('both', both)))
    np.testing.assert_array_equal(ours.affine, reference.affine)
    np.testing.assert_array_equal(ours.get_fdata(), reference.get_fdata())


@pytest.mark.parametrize('component', ['PHASE', 'REAL', 'IMAGINARY'])
def test_enhanced_phase_frames_and_per_frame_rescaling(tmp_path, component):
  """Magnitude frames beside phase (or real, or imaginary) ones are the volume, that of the classic series
  of the same slices; a frame's own rescaling overrides the shared one."""
  voxels, _ = write_series(tmp_path / 'classic', OBLIQUE, slope=1.5, intercept=-10)

  def rescale(echo, n, groups):
    frame_type = groups.MRImageFrameTypeSequence[0]
    if frame_type.ComplexImageComponent == 'PHASE':
      frame_type.ComplexImageComponent = component
    if n == 5:
      groups.PixelValueTransformationSequence = [pydicom.Dataset()]
      groups.PixelValueTransformationSequence[0].RescaleSlope = '2'
      groups.PixelValueTransformationSequence[0].RescaleIntercept = '0'

  write_enhanced(tmp_path / 'enhanced' / 'IM1', [voxels], OBLIQUE, slope=1.5, intercept=-10, phase=True,
                 edit=rescale)
  classic, _ = dicom.read_series(tmp_path / 'classic')
  enhanced, _ = dicom.read_series(tmp_path / 'enhanced')
  np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-9)
  expected = classic.get_fdata()
  expected[:, :, 5] = voxels[:, :, 5] * 2.0
  np.testing.assert_array_equal(enhanced.get_fdata(), expected)


def test_an_enhanced_file_of_other_frame_counts_is_one_line(tmp_path):
  """NumberOfFrames and the per-frame functional groups disagree, one fewer or one more: refused, not read
  with frames out of place."""
  voxels = np.random.default_rng(0).integers(0, 4000, (24, 20, 8), dtype=np.uint16)
  for frames in (7, 9):
    write_enhanced(tmp_path / str(frames) / 'IM1', [voxels])
    ds = pydicom.dcmread(tmp_path / str(frames) / 'IM1')
    ds.NumberOfFrames = frames
    ds.save_as(tmp_path / str(frames) / 'IM1')
    with pytest.raises(DataError, match=f'IM1: {frames} frames but 8 per-frame functional groups'):
      dicom.read_series(tmp_path / str(frames))


def test_classic_echoes_by_echo_time_and_phase_images_by_image_type(tmp_path):
  """Classic images without EchoNumbers are told apart by EchoTime (as dcm2niix splits them); phase images
  beside the magnitude ones (ImageType's 'P', as Siemens and Philips mark them) are left out."""
  def echo_time(ms):
    def edit(n, ds):
      ds.EchoTime = ms
    return edit

  def image_type(kind):
    def edit(n, ds):
      ds.ImageType = ['ORIGINAL', 'PRIMARY', f'{kind}_FFE', kind, 'FFE']
    return edit

  first, uid = write_series(tmp_path / 'echoes', edit=echo_time(5.0))
  second, _ = write_series(tmp_path / 'echoes', uid=uid, edit=echo_time(10.0), seed=1)
  assert [s.name for s in dicom.find_series(tmp_path / 'echoes')] == [f'{uid}:1', f'{uid}:2']
  for echo, voxels in ((1, first), (2, second)):
    nii, _ = dicom.read_series(tmp_path / 'echoes', f'{uid}:{echo}')
    np.testing.assert_array_equal(nii.get_fdata(), voxels)
  magnitude, uid = write_series(tmp_path / 'phase', edit=image_type('M'))
  write_series(tmp_path / 'phase', uid=uid, edit=image_type('P'), seed=1)
  assert [s.name for s in dicom.find_series(tmp_path / 'phase')] == [uid]
  np.testing.assert_array_equal(dicom.read_series(tmp_path / 'phase')[0].get_fdata(), magnitude)


def test_localizers_under_the_series_uid_are_left_out(tmp_path, caplog):
  """Localizers exported under the series' SeriesInstanceUID: axial and coronal ones (no marker), and a
  sagittal one far from the stack marked LOCALIZER in its ImageType, as GE marks them."""
  voxels, uid = write_series(tmp_path)
  write_series(tmp_path, AXIAL, offsets=STEPS[:1], uid=uid, seed=1)
  write_series(tmp_path, CORONAL, offsets=STEPS[:1], uid=uid, seed=2)

  def localizer(n, ds):
    ds.ImageType = ['ORIGINAL', 'PRIMARY', 'LOCALIZER']
  write_series(tmp_path, offsets=[40.0], uid=uid, seed=3, edit=localizer)
  halfway = np.sqrt(0.5)  # a plane 45 degrees from the stack's
  write_series(tmp_path, ((0, 1, 0), (halfway, 0, -halfway)), offsets=STEPS[:1], uid=uid, seed=4)
  nii, _ = dicom.read_series(tmp_path)
  np.testing.assert_array_equal(nii.get_fdata(), voxels)
  assert '4 localizer slice(s) (marked so, or in another plane than its other 8) left out' in caplog.text


def test_copies_of_a_series_are_one_volume(tmp_path):
  voxels, _ = write_series(tmp_path / 'export' / 'a')
  shutil.copytree(tmp_path / 'export' / 'a', tmp_path / 'export' / 'b')  # the export unpacked twice
  assert [len(s.slices) for s in dicom.find_series(tmp_path / 'export')] == [8]
  np.testing.assert_array_equal(dicom.read_series(tmp_path / 'export')[0].get_fdata(), voxels)


def test_broken_files_of_other_series_are_left_out_with_a_warning(tmp_path, caplog):
  """A partly copied file of another series (unreadable header), or a multi-frame file without functional
  groups, does not stop the series read; a broken file of the series read does, and a lone one is a
  one-line error even where decompressing it fails."""
  voxels, uid = write_series(tmp_path / 'dcm' / 'dess')
  write_series(tmp_path / 'dcm' / 'localizer', CORONAL, offsets=STEPS[:6], seed=1)
  write_series(tmp_path / 'dcm' / 'capture', offsets=STEPS[:2], seed=2, edit=_multi_frame)
  cut = sorted((tmp_path / 'dcm' / 'localizer').iterdir())[0]
  cut.write_bytes(cut.read_bytes()[:300])
  nii, report = dicom.read_series(tmp_path / 'dcm')
  np.testing.assert_array_equal(nii.get_fdata(), voxels)
  assert report['series_used'] == uid
  assert '2 DICOM file(s) left out' in caplog.text and cut.name in caplog.text
  with pytest.raises(DataError, match='multi-frame file without per-frame functional groups'):
    dicom.read_series(tmp_path / 'dcm', dicom.find_series(tmp_path / 'dcm')[-1].uid)
  write_series(tmp_path / 'deflated', offsets=STEPS[:1])
  path = next((tmp_path / 'deflated').iterdir())
  ds = pydicom.dcmread(path)
  ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
  ds.save_as(path, enforce_file_format=True)
  path.write_bytes(path.read_bytes()[:-len(ds.PixelData) // 2])
  with pytest.raises(DataError, match='DICOM header unreadable') as e:
    dicom.read_series(tmp_path / 'deflated')
  assert '\n' not in str(e.value)


def _del_position(n, ds):
  if n == 2:
    del ds.ImagePositionPatient


def _swap_size(n, ds):
  if n == 3:
    ds.Rows, ds.Columns = ds.Columns, ds.Rows  # the same number of pixels, another shape


def _multi_frame(n, ds):
  ds.NumberOfFrames = 2 if n == 0 else 1


@pytest.mark.parametrize('kwargs, message', [
  (dict(offsets=[0, 0.7, 1.4, 2.1, 2.8, 3.5, 4.2, 5.2]), 'uneven slice spacing, steps from 0.7 to 1 mm'),
  (dict(offsets=[0, 0.7, 1.4, 2.1, 2.8, 3.53, 4.2]), 'uneven slice spacing, steps from 0.67 to 0.73 mm'),
  (dict(offsets=[0, 0.7, 1.4, 1.4, 2.1, 2.8]), 'duplicate slice positions'),
  (dict(edit=_swap_size), 'mixed-size series, Rows/Columns'),
  (dict(edit=_del_position), 'lacks ImagePositionPatient'),
  (dict(offsets=[0.0]), 'at least 2'),
  (dict(edit=_multi_frame), 'multi-frame file without per-frame functional groups'),
  (dict(spacing=(0.0, 0.0)), r'PixelSpacing \[0.0, 0.0\] in .*, expected two positive sizes'),
], ids=['uneven', 'slightly-uneven', 'duplicate', 'mixed', 'no-position', 'one-slice', 'multi-frame',
        'zero-spacing'])
def test_broken_series_are_one_line_errors(tmp_path, kwargs, message):
  write_series(tmp_path / 'dcm', **kwargs)
  with pytest.raises(DataError, match=message) as e:
    dicom.read_series(tmp_path / 'dcm')
  assert '\n' not in str(e.value) and str(tmp_path / 'dcm') in str(e.value)


def test_folder_without_dicom_files(tmp_path):
  with pytest.raises(DataError, match='no DICOM image file'):
    dicom.read_series(tmp_path)
  (tmp_path / 'notes.txt').write_text('not an image')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'blob').write_bytes(bytes(range(256)))
  # Raw pixels whose first value is 8, as a DICOM data set without preamble would start: no element follows.
  np.array([8, 0, 0, 0, 7, 9] * 40, np.uint16).tofile(tmp_path / 'sub' / 'raw.bin')
  # ... and one whose second value is no element number of a group's first elements (0x4000 >= 0x100).
  np.array([8, 0x4000, 10, 0] * 60, np.uint16).tofile(tmp_path / 'sub' / 'raw2.bin')
  assert not dicom.is_dicom_folder(tmp_path)
  with pytest.raises(DataError, match='no DICOM image file'):
    dicom.find_series(tmp_path)


def test_a_slice_of_the_stacks_plane_with_its_normal_flipped_is_no_localizer(tmp_path):
  """A slice in the stack's plane but with its row cosine reversed (normal flipped) is not left out as a
  localizer (normals compared either way): the series is refused as mixed."""
  _, uid = write_series(tmp_path)
  write_series(tmp_path, ((0, -1, 0), (0, 0, -1)), offsets=[40.0], uid=uid, seed=1)
  with pytest.raises(DataError, match='mixed-size series, ImageOrientationPatient'):
    dicom.read_series(tmp_path)
