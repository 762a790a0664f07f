"""Prediction: masks in the input's voxel grid for any voxel order and in-plane size, exact reorientation,
label values, directories, DICOM series (grid as SimpleITK converts it, laterality), the measures and maps
written beside the masks, and one-line errors."""

import csv
import fcntl
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import time

import dcm2niix
import matplotlib.image
import metaimage
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import SAGITTAL, write_enhanced, write_series

from configs import default, eas, tiny
from easunet_jax import figures, inference, metrics, parallel, pose, predict, pretrained, reports, steps
from easunet_jax.data import knee, phantom, volumes
from easunet_jax.errors import CheckpointError, ConfigError, DataError

# Canonical axis i goes to axis ORNT[i, 0], flipped where ORNT[i, 1] = -1: the sagittal axis ends last and
# anterior-posterior runs backwards, as in many scanners' files.
ORNT = np.array([[2, 1], [0, -1], [1, 1]])


@pytest.fixture(scope='module')
def run(trained_tiny, tmp_path_factory):
  """(workdir, canonical file, permuted file) of the session's trained tiny run and a phantom knee of another
  size and spacing (in-plane not a multiple of the tiny network's stride, 4)."""
  root = tmp_path_factory.mktemp('predict')
  image, _, affine = phantom.make_subject(7, shape=(6, 42, 38), spacing=(3.0, 1.6, 1.8))
  canonical = root / 'canonical.nii.gz'
  nib.save(nib.Nifti1Image(image, affine), canonical)
  permuted = root / 'permuted.nii.gz'
  permuted_affine = affine @ nib.orientations.inv_ornt_aff(ORNT, image.shape)
  nib.save(nib.Nifti1Image(nib.orientations.apply_orientation(image, ORNT), permuted_affine), permuted)
  return trained_tiny[1], canonical, permuted


def _config(**predict_fields):
  config = tiny.get_config()
  config.predict.update(predict_fields)
  return config


def test_permuted_input_predicts_in_its_own_grid(run, tmp_path):
  workdir, _, permuted = run
  [result] = predict.predict(_config(), workdir, permuted, tmp_path / 'permuted_mask.nii.gz')
  source, mask = nib.load(permuted), nib.load(tmp_path / 'permuted_mask.nii.gz')
  assert mask.shape == source.shape == (42, 38, 6)
  np.testing.assert_allclose(mask.affine, source.affine, atol=1e-6)
  assert mask.get_data_dtype() == np.uint8
  assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
  assert {'fc', 'tc'} <= set(result['regions'])
  assert {'volume_mm3', 'thickness_mean_mm', 'area_mm2', 'thin_fraction'} <= set(result['regions']['fc'])
  thickness = nib.load(tmp_path / 'permuted_mask_thickness.nii.gz')
  assert thickness.shape == source.shape and np.allclose(thickness.affine, source.affine, atol=1e-6)
  for name in ('permuted_mask_thickness.png', 'permuted_mask_slices.png', 'permuted_mask_measures.csv',
               'permuted_mask_report.md'):
    assert (tmp_path / name).stat().st_size > 0


def test_both_knees_in_view_are_warned_of_and_get_no_compartments(run, tmp_path, monkeypatch, caplog):
  """A knee and its mirror image 40 slices of 3 mm apart: cartilage over 150 mm from left to right, no one
  knee's. Its plates are measured (both knees'), its compartments, which would each be a whole knee, not."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  source = nib.load(canonical)
  knee = np.asarray(source.dataobj)
  both = np.concatenate([knee[::-1], np.zeros((40, *knee.shape[1:]), knee.dtype), knee])
  nib.save(nib.Nifti1Image(both, source.affine), tmp_path / 'both.nii.gz')
  with caplog.at_level(logging.WARNING):
    [result] = predict.predict(_config(), workdir, tmp_path / 'both.nii.gz', tmp_path / 'mask.nii.gz')
  assert set(result['regions']) == {'fc', 'tc'}
  mask = np.asarray(nib.load(tmp_path / 'mask.nii.gz').dataobj) > 0
  width = (np.flatnonzero(mask.any(axis=(1, 2)))[[0, -1]] @ [-1, 1] + 1) * 3.0
  assert width > 150 and (f"both.nii.gz: cartilage spans {width:.0f} mm from left to right, more than one "
                          "knee's (under 130 mm): both knees in the field of view?") in caplog.text
  assert 'no gap between medial and lateral' not in caplog.text


def test_a_second_call_of_the_same_model_compiles_nothing(run, tmp_path, monkeypatch, caplog):
  """A notebook's loop over predict.predict: the network compiled for a slice shape by one call is the next
  call's (the same masks), until _PROGRAMS_KEPT other programs have been compiled since. The scan's timing
  line gives the compilation apart from the scan's time."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference, '_PROGRAMS', {})
  with caplog.at_level(logging.INFO):
    [first] = predict.predict(_config(), workdir, canonical, tmp_path / 'first.nii.gz')
    [again] = predict.predict(_config(), workdir, canonical, tmp_path / 'again.nii.gz')
  assert first['compile_s'] > 0 and again['compile_s'] == 0
  timing = [m for r in caplog.records if (m := r.getMessage()).startswith('predict 1/1')]
  assert [re.sub(r'[\d.]+ s', 'X s', m.split(': ', 1)[1]) for m in timing] == [
      f'{canonical.name} in X s (forward passes X s), plus X s compiling',
      f'{canonical.name} in X s (forward passes X s)']
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / 'again.nii.gz').dataobj),
                                np.asarray(nib.load(tmp_path / 'first.nii.gz').dataobj))
  monkeypatch.setattr(inference, '_PROGRAMS_KEPT', 1)
  [zoomed] = predict.predict(_config(zoom=2.0), workdir, canonical, tmp_path / 'zoomed.nii.gz')
  assert zoomed['compile_s'] > 0  # slices of another shape
  [evicted] = predict.predict(_config(), workdir, canonical, tmp_path / 'evicted.nii.gz')
  assert evicted['compile_s'] > 0 and len(inference._PROGRAMS) == 1


def test_a_nifti2_scan_gets_a_nifti2_mask_without_its_display_range_and_intent(run, tmp_path):
  workdir, canonical, _ = run
  source = nib.load(canonical)
  scan = nib.Nifti2Image(np.asarray(source.dataobj), source.affine)
  scan.header['cal_min'], scan.header['cal_max'] = -5.0, 1000.0
  scan.header.set_intent('estimate')
  nib.save(scan, tmp_path / 'scan.nii.gz')
  nib.save(nib.Nifti2Pair(scan.dataobj, scan.affine, scan.header), tmp_path / 'pair.hdr')  # .hdr + .img
  for name in ('scan.nii.gz', 'pair.hdr'):
    predict.predict(_config(), workdir, tmp_path / name, tmp_path / 'mask.nii.gz')
    for output in ('mask.nii.gz', 'mask_thickness.nii.gz'):
      written = nib.load(tmp_path / output)
      assert isinstance(written, nib.Nifti2Image) and written.shape == source.shape
      assert written.header['cal_min'] == written.header['cal_max'] == 0
      assert written.header.get_intent()[0] == 'none'


def _thresholds(self, image_SHW):
  """A stand-in network that thresholds the normalised image (the tiny run's masks may be empty)."""
  del self
  return np.stack([image_SHW < 0.3, (image_SHW >= 0.3) & (image_SHW < 0.6), image_SHW >= 0.6], -1).astype(
      np.float32)


def test_reorientation_is_exact(run, tmp_path, monkeypatch):
  """The permuted file's mask is the permuted canonical file's mask, voxel for voxel, through resampling and
  padding."""
  workdir, canonical, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  for path in (canonical, permuted):
    predict.predict(_config(), workdir, path, tmp_path / path.name)
  canonical_mask = np.asarray(nib.load(tmp_path / canonical.name).dataobj)
  assert len(np.unique(canonical_mask)) == 3
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / permuted.name).dataobj),
                                nib.orientations.apply_orientation(canonical_mask, ORNT))


def test_the_slices_figure_numbers_each_slice_as_the_files_voxels(run, tmp_path, monkeypatch):
  """A file whose voxels run from the patient's right to the left: its slices figure numbers each slice by
  the file's voxel index (as a viewer shows it), not by the RAS order the figure is drawn from."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  numbers = []
  monkeypatch.setattr(figures, 'plot_prediction_slices', lambda *args: numbers.append(list(args[6])))
  nii = nib.load(canonical)
  to_the_left = np.array([[0, -1], [1, 1], [2, 1]])
  nib.save(nib.Nifti1Image(np.asarray(nii.dataobj)[::-1],
                           nii.affine @ nib.orientations.inv_ornt_aff(to_the_left, nii.shape)),
           tmp_path / 'to_the_left.nii.gz')
  for path in (canonical, tmp_path / 'to_the_left.nii.gz'):
    predict.predict(_config(), workdir, path, tmp_path / 'out' / path.name)
  assert numbers == [list(range(nii.shape[0])), list(range(nii.shape[0]))[::-1]]


def test_zoom_enlarges_the_slices_the_network_sees(run, tmp_path, monkeypatch):
  workdir, canonical, _ = run
  sizes = []

  def record(self, image_SHW):
    sizes.append(image_SHW.shape[1:])
    return _thresholds(self, image_SHW)

  monkeypatch.setattr(inference.Network, '__call__', record)
  for zoom in (1.0, 2.0):
    predict.predict(_config(zoom=zoom, subpixel_tta=False, orientation_check=False), workdir, canonical,
                    tmp_path / f'{zoom}.nii.gz')
    assert nib.load(tmp_path / f'{zoom}.nii.gz').shape == nib.load(canonical).shape
  (h1, w1), (h2, w2) = sizes
  # Twice the pixels per axis, up to the padding to the tiny network's stride (4).
  assert abs(h2 - 2 * h1) <= 8 and abs(w2 - 2 * w1) <= 8 and h2 > 1.5 * h1 and w2 > 1.5 * w1, sizes


def _unsure_of_fc(self, image_SHW):
  """A stand-in network sure of TC (probabilities 0.1 / 0.1 / 0.8) above 0.6 of the normalised image and
  unsure of FC (0.4 / 0.6 / 0) from 0.3 to 0.6."""
  del self
  fc, tc = ((image_SHW >= 0.3) & (image_SHW < 0.6))[..., None], (image_SHW >= 0.6)[..., None]
  return np.where(tc, [0.1, 0.1, 0.8], np.where(fc, [0.4, 0.6, 0.0], [1.0, 0.0, 0.0])).astype(np.float32)


def test_background_weight_trims_unsure_cartilage_only(run, tmp_path, monkeypatch):
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _unsure_of_fc)
  masks = {}
  for weight in (1.0, 2.0):
    predict.predict(_config(background_weight=weight), workdir, canonical, tmp_path / f'{weight}.nii.gz')
    masks[weight] = np.asarray(nib.load(tmp_path / f'{weight}.nii.gz').dataobj)
  assert (masks[1.0] == 1).sum() > 100 and not (masks[2.0] == 1).any()
  assert (masks[2.0] == 2).sum() > 0.8 * (masks[1.0] == 2).sum() > 0
  # A voxel keeps its class or becomes background, never the other plate.
  assert np.all((masks[2.0] == 0) | (masks[2.0] == masks[1.0]))


def test_probabilities_are_those_of_the_mask_in_the_scans_grid(run, tmp_path, monkeypatch, caplog):
  workdir, _, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _unsure_of_fc)
  [result] = predict.predict(_config(), workdir, permuted, tmp_path / 'mask.nii.gz', save_probabilities=True)
  source, saved = nib.load(permuted), nib.load(tmp_path / 'mask_probabilities.nii.gz')
  assert result['probabilities'] == str(tmp_path / 'mask_probabilities.nii.gz')
  assert saved.shape == (*source.shape, 3) and saved.get_data_dtype() == np.uint8
  np.testing.assert_allclose(saved.affine, source.affine, atol=1e-6)
  probabilities = saved.get_fdata()
  np.testing.assert_allclose(probabilities.sum(-1), 1, atol=2 / 255)
  stored_sum = saved.dataobj.get_unscaled().sum(-1, dtype=int)  # rounded to 1/255, not cut: 255 on average
  assert abs(stored_sum.mean() - 255) < 0.2 and np.abs(stored_sum - 255).max() <= 1
  # Not one-hot: the stand-in network's own probabilities inside the plates.
  assert np.isclose(probabilities[..., 1], 0.6, atol=1 / 255).sum() > 10
  assert np.isclose(probabilities[..., 2], 0.8, atol=1 / 255).sum() > 10
  mask = np.asarray(nib.load(tmp_path / 'mask.nii.gz').dataobj)
  top_two = np.sort(probabilities, -1)[..., -2:]
  sure = (top_two[..., 1] - top_two[..., 0] > 2 / 255) & (mask > 0)  # small components: background
  assert (mask[sure] == 1).sum() > 10 and (mask[sure] == 2).sum() > 10
  np.testing.assert_array_equal(probabilities.argmax(-1)[sure], mask[sure])

  # A batch writes probabilities/<scan>; a scan an earlier run segmented without them is not kept.
  scans, out = tmp_path / 'scans', tmp_path / 'out'
  scans.mkdir()
  (scans / 'a.nii.gz').write_bytes(permuted.read_bytes())
  predict.predict(_config(), workdir, scans, out)
  assert not (out / 'probabilities').exists()
  predict.predict(_config(), workdir, scans, out, continue_prediction=True, save_probabilities=True)
  np.testing.assert_array_equal(np.asarray(nib.load(out / 'probabilities' / 'a.nii.gz').dataobj),
                                np.asarray(saved.dataobj))
  # Segmented again without them: the earlier probabilities, not of the new mask, are removed.
  predict.predict(_config(background_weight=2.0), workdir, scans, out)
  with caplog.at_level(logging.WARNING):  # one scan: nothing to keep, and said so
    predict.predict(_config(background_weight=2.0), workdir, permuted, tmp_path / 'mask.nii.gz',
                    continue_prediction=True)
  assert (f'--continue_prediction keeps the scans of a folder that an earlier run finished; {permuted} is '
          'one scan, segmented again') in caplog.text
  assert not (out / 'probabilities' / 'a.nii.gz').exists()
  assert not (tmp_path / 'mask_probabilities.nii.gz').exists()
  # A scan named as a mask's probabilities would be: not removed as theirs.
  (tmp_path / 'mask_probabilities.nii.gz').write_bytes(permuted.read_bytes())
  _one_line_error(ConfigError, "mask_probabilities.nii.gz: predict removes a mask's earlier probabilities, "
                  'and this is an input scan or label map; choose another --output', _config(), workdir,
                  tmp_path / 'mask_probabilities.nii.gz', tmp_path / 'mask.nii.gz')
  assert (tmp_path / 'mask_probabilities.nii.gz').exists()


def test_oai_zib_values_and_directory_in_directory_out(run, tmp_path, monkeypatch):
  workdir, canonical, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for path in (canonical, permuted):
    (inputs / path.name).write_bytes(path.read_bytes())
  # The canonical scan again as ITK's MetaImage (LPS pose) and as a NIfTI pair (.hdr + .img): their masks
  # are single NIfTI files, the canonical one's.
  nii = nib.load(canonical)
  metaimage.write(inputs / 'itk.mha', np.asarray(nii.dataobj), nii.affine)
  nib.save(nib.Nifti1Pair(np.asarray(nii.dataobj), nii.affine), inputs / 'pair.hdr')
  results = predict.predict(_config(label_values='oai-zib'), workdir, inputs, tmp_path / 'out')
  masks = [tmp_path / 'out' / name for name in (canonical.name, 'itk.nii.gz', 'pair.nii.gz', permuted.name)]
  assert [r['output'] for r in results] == list(map(str, masks))
  for path, mask_path in zip((canonical, canonical, canonical, permuted), masks, strict=True):
    mask = nib.load(mask_path)
    assert mask.shape == nib.load(path).shape
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 2, 4}
  # FC is written 2 and TC 4: the compact mask's 1 and 2.
  predict.predict(_config(), workdir, canonical, tmp_path / 'compact.nii.gz')
  compact = np.asarray(nib.load(tmp_path / 'compact.nii.gz').dataobj)
  assert set(np.unique(compact)) == {0, 1, 2}
  np.testing.assert_array_equal(nib.load(masks[0]).dataobj, np.array([0, 2, 4])[compact])
  for other in masks[1:3]:
    assert type(nib.load(other)) is nib.Nifti1Image
    np.testing.assert_array_equal(nib.load(other).dataobj, nib.load(masks[0]).dataobj)
    np.testing.assert_allclose(nib.load(other).affine, nib.load(masks[0]).affine, atol=1e-6)
  # Kept masks are scored in the values they were written in: each against itself, 100; the pair's data
  # file written again (the same voxels), its mask is made again.
  (tmp_path / 'labels').mkdir()
  for mask in masks:
    (tmp_path / 'labels' / mask.name).write_bytes(mask.read_bytes())
  (inputs / 'pair.img').write_bytes((inputs / 'pair.img').read_bytes())
  os.utime(inputs / 'pair.img', ns=(time.time_ns() + 10 ** 9,) * 2)
  written = [mask.stat().st_mtime_ns for mask in masks]
  results = predict.predict(_config(label_values='oai-zib'), workdir, inputs, tmp_path / 'out',
                            continue_prediction=True, labels=tmp_path / 'labels')
  assert [r['scores'][plate]['dice'] for r in results for plate in ('fc', 'tc')] == [100.0] * 8
  assert [mask.stat().st_mtime_ns != before for mask, before in zip(masks, written)] == [
      False, False, True, False]


def _dicom_knee(folder, canonical, knee_x, laterality=None, enhanced=False):
  """The canonical file's knee written as a sagittal DICOM series (LPS origin x = knee_x), one file per slice
  or one enhanced multi-frame file: columns run posterior, rows inferior, slices to the patient's right
  (RAS +x), as knee DESS series do; returns the image as the DICOM holds it, in canonical order."""
  nii = nib.load(canonical)
  image = np.round(np.asarray(nii.dataobj) * 1000).astype(np.uint16)  # (right, anterior, superior)
  spacing = nii.header.get_zooms()
  geometry = dict(cosines=SAGITTAL, origin=(knee_x, -20.0, 30.0), spacing=(spacing[2], spacing[1]),
                  offsets=np.arange(image.shape[0]) * spacing[0], laterality=laterality)
  voxels = image.transpose(1, 2, 0)[::-1, ::-1]
  if enhanced:
    write_enhanced(folder / 'IM1', [voxels], **geometry)
  else:
    write_series(folder, voxels=voxels, **geometry)
  return image.astype(np.float32)


def test_dicom_series_predicts_in_its_own_grid(run, tmp_path, monkeypatch, capsys):
  """A sagittal DICOM series of a right knee: the mask has SimpleITK's shape and affine, holds the mask of the
  same image given as canonical NIfTI, and the report says 'right knee'."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  image = _dicom_knee(tmp_path / 'dess', canonical, knee_x=-80.0)  # LPS x < 0: the patient's right
  nib.save(nib.Nifti1Image(image, nib.load(canonical).affine), tmp_path / 'same.nii.gz')
  [result] = predict.predict(_config(), workdir, tmp_path / 'dess', tmp_path / 'out' / 'dess_mask.nii.gz')
  printed, (fc, tc) = capsys.readouterr().out, (result['regions'][plate] for plate in ('fc', 'tc'))
  assert 'right knee (from the position' in printed
  assert (f"FC {fc['volume_mm3']:.0f} mm^3, mean thickness {fc['thickness_mean_mm']:.2f} mm; "
          f"TC {tc['volume_mm3']:.0f} mm^3") in printed
  assert result['laterality'] == 'R'
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / 'dess')))
  sitk.WriteImage(reader.Execute(), str(tmp_path / 'sitk.nii.gz'))
  reference, mask = nib.load(tmp_path / 'sitk.nii.gz'), nib.load(tmp_path / 'out' / 'dess_mask.nii.gz')
  assert mask.shape == reference.shape
  np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-3)
  predict.predict(_config(), workdir, tmp_path / 'same.nii.gz', tmp_path / 'same_mask.nii.gz')
  expected = np.asarray(nib.load(tmp_path / 'same_mask.nii.gz').dataobj)
  assert len(np.unique(expected)) == 3
  np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.transpose(1, 2, 0)[::-1, ::-1])
  for name in ('dess_mask_thickness.nii.gz', 'dess_mask_thickness.png', 'dess_mask_measures.csv'):
    assert (tmp_path / 'out' / name).exists()


def test_a_scan_named_in_latin_1_is_written_under_its_name(run, tmp_path, monkeypatch):
  """A folder named in another encoding than UTF-8 (a Windows export's 'MÜLLER' in Latin-1, which Python
  holds with a surrogate): its mask, figures and reports are written, the reports with the name's bytes."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  name = os.fsdecode(b'M\xdcLLER')
  _dicom_knee(tmp_path / 'scans' / name, canonical, knee_x=-80.0)
  # Its warnings name the scan (its one tibial plate has no compartments): pytest-xdist cannot send a report
  # whose captured log holds the name's surrogate, so they are not logged here.
  logging.disable(logging.WARNING)
  try:
    predict.predict(_config(), workdir, tmp_path / 'scans', tmp_path / 'out')
  finally:
    logging.disable(logging.NOTSET)
  for path in (f'{name}.nii.gz', f'slices/{name}.png', f'thickness/{name}.png', 'report.md'):
    assert (tmp_path / 'out' / path).exists()
  assert b'M\xdcLLER' in (tmp_path / 'out' / 'measures.csv').read_bytes()


def test_directory_of_dicom_scans_writes_one_csv_and_report(run, tmp_path, monkeypatch, caplog):
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  # An enhanced file, its frame laterality decides.
  _dicom_knee(tmp_path / 'scans' / 'a', canonical, knee_x=-80.0, laterality='L', enhanced=True)
  _dicom_knee(tmp_path / 'scans' / 'b', canonical, knee_x=3.0)  # too near the midline: undecided
  results = predict.predict(_config(), workdir, tmp_path / 'scans', tmp_path / 'out')
  assert [r['laterality'] for r in results] == ['L', None]
  assert 'from the DICOM FrameLaterality tag' in results[0]['laterality_text']
  assert 'undecided' in results[1]['laterality_text']
  with open(tmp_path / 'out' / 'measures.csv') as f:
    rows = list(csv.DictReader(f))
  # The knee's six sagittal slices (18 mm) hold one tibial plate, whose halves are not the knee's: its
  # compartments are not measured, with a warning, only its plates.
  assert len(rows) == 4 and [r['laterality'] for r in rows[::2]] == ['left', 'unknown']
  assert [r['region'] for r in rows] == ['fc', 'tc'] * 2
  assert caplog.text.count('no gap between medial and lateral plates') == 2
  report = (tmp_path / 'out' / 'report.md').read_text()
  made_by = json.loads((tmp_path / 'out' / 'measures' / 'a.json').read_text())
  assert (f"\nMasks made by step {made_by['step']} of `{workdir}` (weights SHA-256 "
          f"{made_by['settings']['model_sha256'][:12]}).\n") in report
  assert report.count('](<thickness/') == 2 and (tmp_path / 'out' / 'thickness' / 'b.png').exists()
  assert report.count('](<slices/') == 2 and (tmp_path / 'out' / 'slices' / 'b.png').exists()
  # A mask file named for a folder of several series is refused, unless --series picks one of its tree; for
  # one series in a subfolder (as a viewer exports it), it is that series' mask, not a folder of that name.
  with pytest.raises(ConfigError, match=r'holds 2 scans, whose masks go into a folder; name a folder, or '
                     r'pick one DICOM series of them with --series$'):
    predict._inputs(tmp_path / 'scans', tmp_path / 'mask.nii.gz')
  assert predict._inputs(tmp_path / 'scans', tmp_path / 'mask.nii.gz', series='1.2.3') == (
      [(tmp_path / 'scans', tmp_path / 'mask.nii.gz')], False)
  shutil.copytree(tmp_path / 'scans' / 'b', tmp_path / 'export' / 'SE1')
  assert predict._inputs(tmp_path / 'export', tmp_path / 'mask.nii.gz') == (
      [(tmp_path / 'export' / 'SE1', tmp_path / 'mask.nii.gz')], False)
  monkeypatch.chdir(tmp_path / 'export' / 'SE1')  # --input=. or SE1/sub/.. is the folder's series, named SE1
  (tmp_path / 'export' / 'SE1' / 'sub').mkdir()
  for given in ('.', 'sub/..'):
    assert predict._inputs(given, tmp_path / 'out') == (
        [((tmp_path / 'export' / 'SE1').resolve(), tmp_path / 'out' / 'SE1.nii.gz')], False)
  (tmp_path / 'export' / 'SE1' / 'sub').rmdir()
  one_file = next(tmp_path.glob('export/SE1/*'))  # a DICOM file given alone: its folder is what reads
  with pytest.raises(DataError, match=rf'^{one_file}: a DICOM file; give its folder, '
                     rf'--input={one_file.parent} \(with --series to pick one of the series there\)$'):
    predict._inputs(one_file, tmp_path / 'mask.nii.gz')
  # A volume file beside series folders is one more scan of the batch, but not one of a series' name; DICOM
  # files beside a volume file are not read, and the warning says so.
  shutil.copy(canonical, tmp_path / 'scans' / 'c.nii.gz')
  assert predict._inputs(tmp_path / 'scans', tmp_path / 'out') == ([
      (tmp_path / 'scans' / name, tmp_path / 'out' / mask) for name, mask in (
          ('c.nii.gz', 'c.nii.gz'), ('a', 'a.nii.gz'), ('b', 'b.nii.gz'))], True)
  shutil.copy(canonical, tmp_path / 'scans' / 'b.nii.gz')
  _one_line_error(DataError, r'scans b each come twice \(as two files of .*, or a file and a DICOM folder\)',
                  _config(), workdir, tmp_path / 'scans', tmp_path / 'out')
  (tmp_path / 'scans' / 'b.nii.gz').unlink()
  series_files = len(list((tmp_path / 'export' / 'SE1').iterdir()))
  shutil.copy(canonical, tmp_path / 'export' / 'SE1' / 'converted.nii.gz')
  assert predict._inputs(tmp_path / 'export' / 'SE1', tmp_path / 'out') == (
      [(tmp_path / 'export' / 'SE1' / 'converted.nii.gz', tmp_path / 'out' / 'converted.nii.gz')], True)
  assert (f"{tmp_path / 'export' / 'SE1'}: {series_files} DICOM file(s) beside its volume files not read"
          in caplog.text)
  (tmp_path / 'export' / 'SE1' / 'converted.nii.gz').unlink()
  [given] = predict.predict(_config(), workdir, tmp_path / 'scans' / 'b', tmp_path / 'b_mask.nii.gz',
                            laterality='R')
  assert given['laterality'] == 'R' and 'given by --laterality' in given['laterality_text']
  # Labels drawn on dcm2niix's NIfTI of the series (another voxel order than ours): here the mask itself.
  dcm2niix.main(['-z', 'y', '-f', 'b', '-o', str(tmp_path), str(tmp_path / 'scans' / 'b')], check=True,
                capture_output=True)
  converted, mask = nib.load(tmp_path / 'b.nii.gz'), nib.load(tmp_path / 'b_mask.nii.gz')
  assert nib.aff2axcodes(converted.affine) != nib.aff2axcodes(mask.affine)
  to_converted = nib.orientations.ornt_transform(*map(nib.io_orientation, (mask.affine, converted.affine)))
  volumes.save_volume(tmp_path / 'b_labels.nii.gz', np.array([0, 2, 4], np.uint8)[
      nib.orientations.apply_orientation(np.asarray(mask.dataobj), to_converted)], converted.affine)
  [scored] = predict.predict(_config(), workdir, tmp_path / 'scans' / 'b', tmp_path / 'b_mask.nii.gz',
                             labels=tmp_path / 'b_labels.nii.gz')
  assert np.asarray(mask.dataobj).any() and [scored['scores'][p]['dice'] for p in ('fc', 'tc')] == [100, 100]


def _one_line_error(kind, match, *args, **kwargs) -> None:
  with pytest.raises(kind, match=match) as error:
    predict.predict(*args, **kwargs)
  assert '\n' not in str(error.value)


def test_errors_are_one_line(run, tmp_path):
  workdir, canonical, _ = run
  out = tmp_path / 'out.nii.gz'
  _one_line_error(DataError, 'no such input', _config(), workdir, tmp_path / 'absent.nii.gz', out)
  four_d = tmp_path / 'four_d.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
  _one_line_error(DataError, 'expected 3D', _config(), workdir, four_d, out)
  (tmp_path / 'empty').mkdir()
  _one_line_error(DataError, 'no NIfTI, MetaImage or NRRD file .* and no DICOM series in this directory$',
                  _config(), workdir, tmp_path / 'empty', out)
  data_set = tmp_path / 'nnunet'  # a data set's root instead of its images
  (data_set / 'imagesTr').mkdir(parents=True)
  _one_line_error(DataError, f"a data set: --input={data_set / 'imagesTr'} \\(and --labels="
                  f"{data_set / 'labelsTr'} to score", _config(), workdir, data_set, out)
  _one_line_error(DataError, 'a volume file, and --series picks', _config(), workdir, canonical, out,
                  series='1.2.3')
  microns = tmp_path / 'microns.nii.gz'  # voxel sizes written in micrometres: 1000x too many pixels
  nii = nib.load(canonical)
  nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), np.diag([1000, 1000, 1000, 1]) @ nii.affine), microns)
  _one_line_error(DataError, "voxel size 3000 x 1600 x 1800 mm .* check the header's voxel size", _config(),
                  workdir, microns, out)
  twice = tmp_path / 'twice'
  twice.mkdir()
  for name in ('knee.nii', 'knee.nii.gz'):
    nib.save(nib.load(canonical), twice / name)
  _one_line_error(DataError, r'scans knee each come twice \(as two files of \.nii\.gz, \.nii,', _config(),
                  workdir, twice, tmp_path / 'masks')
  _one_line_error(CheckpointError, 'no checkpoint', _config(), tmp_path / 'untrained', canonical, out)
  assert not out.exists()
  # Output folders are made only once the model has loaded: a refused model leaves none behind.
  _one_line_error(CheckpointError, 'no checkpoint', _config(), tmp_path / 'untrained', twice / 'knee.nii',
                  tmp_path / 'batch_out' / 'masks')
  assert not (tmp_path / 'batch_out').exists()


def test_a_scan_is_never_overwritten(run, tmp_path):
  workdir, canonical, _ = run
  scans = tmp_path / 'scans'
  scans.mkdir()
  scan = scans / canonical.name
  scan.write_bytes(canonical.read_bytes())
  for output in (scan, scans, scans / '.'):  # the scan itself, or a mask of the same name beside it
    _one_line_error(ConfigError, 'would overwrite an input scan', _config(), workdir, scan, output)
  # A folder's masks into the folder itself, of any format's scans: a rerun would take them for scans.
  _one_line_error(ConfigError, 'the input folder; the masks go into a folder of their own', _config(),
                  workdir, scans, scans)
  _one_line_error(ConfigError, 'would overwrite an input scan', _config(), workdir, scans, scan)  # its scan
  (tmp_path / 'notes.txt').write_text('mine')
  _one_line_error(ConfigError, 'a file; the masks of a directory', _config(), workdir, scans,
                  tmp_path / 'notes.txt')
  assert (tmp_path / 'notes.txt').read_text() == 'mine'
  thickness = scans / 'knee_thickness.nii.gz'  # the thickness map of a mask named knee.nii.gz
  thickness.write_bytes(canonical.read_bytes())
  _one_line_error(ConfigError, 'would overwrite an input scan', _config(), workdir, thickness,
                  scans / 'knee.nii.gz')
  assert scan.read_bytes() == canonical.read_bytes() and thickness.read_bytes() == canonical.read_bytes()
  # Refused before segmenting: an output folder that a file blocks, and a mask named as another format.
  _one_line_error(DataError, f'{scan}: cannot make the output folder: {scan} is a file', _config(), workdir,
                  scan, scan / 'mask.nii.gz')
  blocked = tmp_path / 'out' / 'slices'  # where a batch's slice figures go
  blocked.parent.mkdir()
  blocked.write_text('mine')
  _one_line_error(DataError, f'{blocked}: cannot make the output folder: {blocked} is a file', _config(),
                  workdir, scans, blocked.parent)
  assert not (blocked.parent / 'knee.nii.gz').exists()
  _one_line_error(ConfigError, 'masks are written as NIfTI', _config(), workdir, scan, tmp_path / 'mask.mha')
  assert not (tmp_path / 'mask.mha').exists()


def _scans_in_csv(path) -> list[str]:
  with open(path) as f:
    return sorted({pathlib.Path(row['scan']).name for row in csv.DictReader(f)})


def test_a_batch_goes_past_a_failed_scan_and_continues_where_it_stopped(run, tmp_path, monkeypatch,
                                                                        dead_mark):
  workdir, canonical, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  scans, out = tmp_path / 'scans', tmp_path / 'out'
  scans.mkdir()
  for name, path in (('a.nii.gz', canonical), ('c.nii.gz', permuted)):
    (scans / name).write_bytes(path.read_bytes())
  nii = nib.load(canonical)  # its header passes the checks made before the model loads; its voxels do not
  nib.save(nib.Nifti1Image(np.ones(nii.shape, np.float32), nii.affine), scans / 'b.nii.gz')
  _one_line_error(DataError, r'1 of 3 scans failed \(their errors above\): b.nii.gz; the others are',
                  _config(), workdir, scans, out)
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'c.nii.gz']
  assert not (out / 'b.nii.gz').exists() and not (out / 'measures' / 'b.json').exists()
  written = {name: (out / name).stat().st_mtime_ns for name in ('a.nii.gz', 'c.nii.gz')}

  (scans / 'b.nii.gz').write_bytes(canonical.read_bytes())  # mended: a rerun segments b alone
  gone = dead_mark('.')  # a killed run's
  left = [out / f'{gone}b.nii.gz', out / 'measures' / f'{gone}b.json']
  for path in left:
    path.write_bytes(b'half')
  results = predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert not any(path.exists() for path in left)
  assert [pathlib.Path(r['output']).name for r in results] == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  assert {name: (out / name).stat().st_mtime_ns for name in written} == written
  for region, row in results[0]['regions'].items():  # a's from its file, b's segmented: the same image
    assert results[1]['regions'][region] == pytest.approx(row, nan_ok=True)
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  assert (out / 'report.md').read_text().count('](<thickness/') == 3

  # A scan changed since is segmented again; other settings make other masks: none is kept.
  os.utime(scans / 'c.nii.gz', ns=(time.time_ns() + 10 ** 9,) * 2)
  predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert (out / 'a.nii.gz').stat().st_mtime_ns == written['a.nii.gz']
  assert (out / 'c.nii.gz').stat().st_mtime_ns != written['c.nii.gz']
  (out / 'slices' / 'a.png').unlink()  # one of a scan's outputs gone: it is segmented again
  predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  rewritten = (out / 'a.nii.gz').stat().st_mtime_ns
  assert rewritten != written['a.nii.gz'] and (out / 'slices' / 'a.png').exists()
  predict.predict(_config(background_weight=2.0), workdir, scans, out, continue_prediction=True)
  assert (out / 'a.nii.gz').stat().st_mtime_ns != rewritten
  rewritten = (out / 'a.nii.gz').stat().st_mtime_ns
  bfloat16 = _config(background_weight=2.0)
  bfloat16.model.dtype = 'bfloat16'  # the same weights computed otherwise: other edges
  predict.predict(bfloat16, workdir, scans, out, continue_prediction=True)
  assert (out / 'a.nii.gz').stat().st_mtime_ns != rewritten
  # So is one whose thickness map or its figure is gone, and each for other weights (a model file or workdir
  # trained again in place) or another side: the settings recorded name them.
  settings = json.loads(predict._report_paths(out / 'a.nii.gz', True)['result'].read_text())['settings']
  assert settings['laterality'] is None and len(settings['model_sha256']) == 64

  def kept(**changed):
    return predict._earlier_result(scans / 'a.nii.gz', out / 'a.nii.gz', settings | changed) is not None

  assert kept()
  assert settings['version'] == predict.RESULT_VERSION and not kept(version=1)  # made by another version
  for name in ('thickness/a.png', 'thickness/a.nii.gz'):
    (out / name).rename(tmp_path / 'aside')
    assert not kept(), name
    (tmp_path / 'aside').rename(out / name)
  assert not kept(laterality='R') and not kept(model_sha256='0' * 64)


def test_a_batch_goes_past_scans_whose_files_fail_the_checks(run, tmp_path, monkeypatch):
  """A scan refused by the checks before the model loads fails alone, a refused label map, or one of
  unknown values (read only as the scan is segmented, or scored from its kept mask), leaves its scan
  unscored (its measures reported); a batch of which every scan fails them is refused at once."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  scans, labels = tmp_path / 'scans', tmp_path / 'labels'
  scans.mkdir(), labels.mkdir()
  nii = nib.load(canonical)
  femoral = np.zeros(nii.shape, np.uint8)
  femoral[1:3, 10:20, 10:20] = 2
  for name in ('a', 'b', 'c', 'd'):
    (scans / f'{name}.nii.gz').write_bytes(canonical.read_bytes())
    nib.save(nib.Nifti1Image(femoral, nii.affine), labels / f'{name}.nii.gz')
  (scans / 'a.nii.gz').write_bytes(b'not a volume')
  (labels / 'c.nii.gz').write_bytes(b'not a volume either')
  nib.save(nib.Nifti1Image(np.full(nii.shape, 9, np.uint8), nii.affine), labels / 'd.nii.gz')
  for continuing in (False, True):  # d segmented, then kept
    _one_line_error(DataError, r'^1 of 4 scans failed \(their errors above\): a.nii.gz; 2 of 4 scans not '
                    r'scored \(their label maps refused above\): c.nii.gz, d.nii.gz; the others', _config(),
                    workdir, scans, tmp_path / 'out', labels=labels, continue_prediction=continuing)
    assert _scans_in_csv(tmp_path / 'out' / 'measures.csv') == ['b.nii.gz', 'c.nii.gz', 'd.nii.gz']
    assert _scans_in_csv(tmp_path / 'out' / 'scores.csv') == ['b.nii.gz']
  (scans / 'd.nii.gz').unlink()
  (scans / 'b.nii.gz').write_bytes(b'')
  (scans / 'c.nii.gz').write_bytes(b'')
  _one_line_error(DataError, r'all 3 scans fail their checks, e.g. .*a.nii.gz', _config(), workdir, scans,
                  tmp_path / 'out2', labels=labels)
  assert not (tmp_path / 'out2' / 'measures.csv').exists()


def test_continuing_keeps_only_what_a_stop_or_a_replaced_scan_left_true(run, tmp_path, monkeypatch):
  """--continue_prediction after a run stopped while it rewrote a mask, into the output folder named another
  way, with a scan replaced by another of an older time stamp: only the scans whose files and settings match
  are kept; a stop keeps every done or kept scan in the reports."""
  workdir, canonical, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  monkeypatch.chdir(tmp_path)
  scans, out = tmp_path / 'scans', tmp_path / 'out'
  scans.mkdir()
  for name in ('b.nii.gz', 'c.nii.gz'):
    (scans / name).write_bytes(canonical.read_bytes())
  predict.predict(_config(), workdir, scans, out)
  assert (canonical.stat().st_size != permuted.stat().st_size)
  stamp = (scans / 'c.nii.gz').stat().st_mtime_ns
  (scans / 'c.nii.gz').write_bytes(permuted.read_bytes())  # replaced, as `cp -p` of an older scan would
  os.utime(scans / 'c.nii.gz', ns=(stamp - 10 ** 9,) * 2)

  segment = predict._segment_scan

  def stop_at(name):
    def stopping(config, network, pixel, source, target, *args):
      if source.name == name:
        predict._save(target, np.zeros(nib.load(source).shape, np.uint8), nib.load(source))  # half done
        raise KeyboardInterrupt
      return segment(config, network, pixel, source, target, *args)
    return stopping

  monkeypatch.setattr(predict, '_segment_scan', stop_at('b.nii.gz'))
  with pytest.raises(KeyboardInterrupt):  # other settings: b is rewritten, and stopped half way
    predict.predict(_config(background_weight=2.0), workdir, scans, out)
  (scans / 'a.nii.gz').write_bytes(canonical.read_bytes())  # a new scan, and one to stop at
  (scans / 'd.nii.gz').write_bytes(canonical.read_bytes())
  monkeypatch.setattr(predict, '_segment_scan', stop_at('d.nii.gz'))
  kept = {}
  monkeypatch.setattr(predict, '_earlier_result', lambda *args, keep=predict._earlier_result: kept.setdefault(
      args[0].name, keep(*args)))
  with pytest.raises(KeyboardInterrupt):  # the folder named relative to the working directory this time
    predict.predict(_config(), workdir, pathlib.Path('scans'), pathlib.Path('out'), continue_prediction=True)
  assert {name for name, result in kept.items() if result} == set()  # b was stopped, c replaced
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  assert np.asarray(nib.load(out / 'b.nii.gz').dataobj).any()  # segmented again, not the half-done mask
  kept.clear()
  monkeypatch.setattr(predict, '_segment_scan', segment)
  results = predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert sorted(name for name, result in kept.items() if result) == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  assert [r['output'] for r in results] == [str(out / f'{n}.nii.gz') for n in 'abcd']
  assert (out / 'report.md').read_text().count('](<thickness/') == 4
  # A stop in a continued batch keeps in the reports the kept scans it had not reached.
  os.utime(scans / 'b.nii.gz', ns=(time.time_ns() + 10 ** 9,) * 2)
  monkeypatch.setattr(predict, '_segment_scan', stop_at('b.nii.gz'))
  kept.clear()
  with pytest.raises(KeyboardInterrupt):
    predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'c.nii.gz', 'd.nii.gz']


def test_records_hold_null_for_undefined_figures_and_tables_name_cases_by_id_and_absolute_path(
    run, tmp_path, monkeypatch):
  """A batch given by relative paths, its tibial plates empty: the records hold null for the undefined
  thickness (JSON has no NaN), which a continued batch reads back as undefined; measures.csv names each scan
  by case id (nnU-Net's _0000 dropped) and absolute path, its figures in full precision."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__',
                      lambda self, image: _thresholds(self, image) * np.array([1, 1, 0], np.float32))
  monkeypatch.chdir(tmp_path)
  names = ('knee_a_0000.nii.gz', 'knee_b_0000.nii.gz')
  (tmp_path / 'scans').mkdir()
  for name in names:
    (tmp_path / 'scans' / name).write_bytes(canonical.read_bytes())

  def no_constant(constant: str):
    raise AssertionError(f'{constant} in a record')

  predict.predict(_config(), workdir, pathlib.Path('scans'), pathlib.Path('out'))
  for name in names:
    record = json.loads((tmp_path / 'out' / 'measures' / name.replace('.nii.gz', '.json')).read_text(),
                        parse_constant=no_constant)
    assert record['result']['regions']['tc']['thickness_mean_mm'] is None
    assert record['result']['regions']['fc']['thickness_mean_mm'] > 0
  # Kept and scored against their own masks as labels, in OAI-ZIB's values (TC empty in both: its
  # thickness error undefined).
  for name in names:
    mask = nib.load(tmp_path / 'out' / name)
    volumes.save_volume(tmp_path / 'labels' / name.replace('_0000', ''),
                        np.array([0, 2, 4], np.uint8)[np.asarray(mask.dataobj)], mask.affine)
  results = predict.predict(_config(), workdir, pathlib.Path('scans'), pathlib.Path('out'),
                            continue_prediction=True, labels=pathlib.Path('labels'))
  assert [(r['case'], r['input'], r['labels']) for r in results] == [
      (case, str(tmp_path / 'scans' / name), str(tmp_path / 'labels' / f'{case}.nii.gz'))
      for case, name in zip(('knee_a', 'knee_b'), names)]
  assert np.isnan(results[0]['regions']['tc']['thickness_mean_mm'])
  fc, tc = results[0]['scores']['fc'], results[0]['scores']['tc']
  assert fc['dice'] == 100 and np.isnan(tc['thickness_error_mm'])
  # Another job's scan into the folder, not named as nnU-Net's: the reports list it, then the earlier scans
  # from their records (nulls read back as undefined), each under its own case id, also from a record of an
  # older version, which names none.
  record = tmp_path / 'out' / 'measures' / 'knee_b_0000.json'
  older = json.loads(record.read_text())
  del older['result']['case']
  record.write_text(json.dumps(older))
  (tmp_path / 'more').mkdir()
  (tmp_path / 'more' / 'knee_c.nii.gz').write_bytes(canonical.read_bytes())
  predict.predict(_config(), workdir, pathlib.Path('more'), pathlib.Path('out'))
  with open(tmp_path / 'out' / 'measures.csv') as f:
    rows = [row for row in csv.DictReader(f) if row['region'] in ('fc', 'tc')]
  assert [(row['case'], row['scan'], row['region']) for row in rows] == [
      (case, str(tmp_path / folder / name), region)
      for case, folder, name in zip(('knee_c', 'knee_a', 'knee_b'), ('more', 'scans', 'scans'),
                                    ('knee_c.nii.gz', *names)) for region in ('fc', 'tc')]
  assert float(rows[2]['thickness_mean_mm']) == results[0]['regions']['fc']['thickness_mean_mm']
  assert rows[3]['thickness_mean_mm'] == 'nan'
  assert '| tc | 0 | n/a |' in (tmp_path / 'out' / 'report.md').read_text()
  with open(tmp_path / 'out' / 'scores.csv') as f:
    scores = list(csv.DictReader(f))
  assert [(row['case'], row['plate'], row['thickness_error_mm'], row['both_empty']) for row in scores] == [
      (case, plate, error, empty) for case in ('knee_a', 'knee_b')
      for plate, error, empty in (('fc', '0.0', '0'), ('tc', 'nan', '1'))]
  assert reports.case_ids(['scan_0000.nii', 'scan_0001.nii', 'series/SE1']) == [
      'scan_0000', 'scan_0001', 'SE1']


def test_a_batchs_reports_list_the_folders_scans_made_alike(run, tmp_path, monkeypatch, caplog):
  """Jobs of an array, each segmenting scans of its own into one folder: each job's reports list every scan of
  the folder made with the same model and settings; those made otherwise are named in a warning and left
  out, as is a scan whose mask was replaced since; a plain rerun stopped part way still lists the scans it
  had not reached; a mask that replaces another scan's of the same name is warned of."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  out = tmp_path / 'out'
  for job, names in (('one', 'ab'), ('two', 'c'), ('three', 'd')):
    (tmp_path / job).mkdir()
    for name in names:
      (tmp_path / job / f'{name}.nii.gz').write_bytes(canonical.read_bytes())
  predict.predict(_config(), workdir, tmp_path / 'one', out)
  [result] = predict.predict(_config(), workdir, tmp_path / 'two', out)
  assert result['output'] == str(out / 'c.nii.gz')
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'b.nii.gz', 'c.nii.gz']
  assert (out / 'report.md').read_text().count('](<thickness/') == 3
  predict.predict(_config(background_weight=2.0), workdir, tmp_path / 'three', out)
  assert _scans_in_csv(out / 'measures.csv') == ['d.nii.gz']
  assert 'left out of its reports: a, b, c' in caplog.text
  segment = predict._segment_scan

  def stop_at_b(config, network, pixel, source, target, *args):
    if source.name == 'b.nii.gz':
      raise KeyboardInterrupt
    return segment(config, network, pixel, source, target, *args)

  monkeypatch.setattr(predict, '_segment_scan', stop_at_b)
  with pytest.raises(KeyboardInterrupt):
    predict.predict(_config(), workdir, tmp_path / 'one', out)
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'c.nii.gz']  # b's record went as it began
  monkeypatch.setattr(predict, '_segment_scan', segment)
  predict.predict(_config(), workdir, tmp_path / 'three' / 'd.nii.gz', out / 'c.nii.gz')  # c replaced
  predict.predict(_config(), workdir, tmp_path / 'one', out)
  assert _scans_in_csv(out / 'measures.csv') == ['a.nii.gz', 'b.nii.gz']
  assert 'replaces one of another scan' not in caplog.text
  (tmp_path / 'four').mkdir()
  (tmp_path / 'four' / 'a.nii.gz').write_bytes(canonical.read_bytes())
  predict.predict(_config(), workdir, tmp_path / 'four', out)
  replaced = tmp_path / 'four' / 'a.nii.gz'
  assert f'{replaced}: its mask replaces one of another scan of that name' in caplog.text


def test_a_batch_folders_reports_are_rewritten_under_its_lock(tmp_path):
  (tmp_path / 'measures').mkdir()
  with (predict._reports_locked(tmp_path), open(tmp_path / 'measures' / '.reports.lock') as other,
        pytest.raises(BlockingIOError)):
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with open(tmp_path / 'measures' / '.reports.lock') as other:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  total = np.count_nonzero(a) + np.count_nonzero(b)
  return 200 * np.count_nonzero(a & b) / total if total else 100.0


def test_masks_are_scored_against_expert_labels(run, tmp_path, monkeypatch, capsys):
  """--labels: each scan's mask against its label map (nnU-Net's <id>_0000 naming, any voxel order), kept
  scans of an earlier run scored from their masks; a label map on another grid or none is one line."""
  workdir, canonical, permuted = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  scans, labels, out = tmp_path / 'scans', tmp_path / 'labels', tmp_path / 'out'
  scans.mkdir()
  (scans / 'knee_0000.nii.gz').write_bytes(canonical.read_bytes())
  (scans / 'permuted.nii.gz').write_bytes(permuted.read_bytes())
  predict.predict(_config(), workdir, scans, out)
  written = {name: (out / name).stat().st_mtime_ns for name in ('knee_0000.nii.gz', 'permuted.nii.gz')}
  # Labels in OAI-ZIB's values (FC 2, TC 4, bones 1 and 3 read as background): the permuted scan's are its
  # mask stored in canonical voxel order (the same grid), the canonical one's its mask moved by two voxels.
  oai_zib = np.array([1, 2, 4], np.uint8)
  mask = np.asarray(nib.load(out / 'permuted.nii.gz').dataobj)
  in_canonical_order = nib.as_closest_canonical(nib.Nifti1Image(oai_zib[mask], nib.load(permuted).affine))
  volumes.save_volume(labels / 'permuted.nii.gz', in_canonical_order.dataobj, in_canonical_order.affine)
  truth = oai_zib[np.roll(np.asarray(nib.load(out / 'knee_0000.nii.gz').dataobj), 2, axis=1)]
  volumes.save_volume(labels / 'knee.nii.gz', truth, nib.load(canonical).affine)

  results = predict.predict(_config(), workdir, scans, out, continue_prediction=True, labels=labels)
  assert {name: (out / name).stat().st_mtime_ns for name in written} == written  # kept, scored from disk
  knee, same = (r['scores'] for r in results)
  # Each kept scan's record holds this run's scores, as scores.csv and the report do.
  for stem, scores in (('knee_0000', knee), ('permuted', same)):
    assert json.loads((out / 'measures' / f'{stem}.json').read_text())['result']['scores'] == scores
  for plate, k, truth_value in (('fc', 1, 2), ('tc', 2, 4)):
    found = np.asarray(nib.load(out / 'knee_0000.nii.gz').dataobj) == k
    assert knee[plate]['dice'] == pytest.approx(_dice(found, truth == truth_value))
    assert 0 < knee[plate]['dice'] < 100
    with_cartilage = np.flatnonzero((truth == 2).any(axis=(1, 2)) | (truth == 4).any(axis=(1, 2)))
    assert knee[plate]['dice_2d'] == pytest.approx(
        np.mean([_dice(found[i], truth[i] == truth_value) for i in with_cartilage]))
    assert same[plate]['dice_2d'] == 100
    assert same[plate]['dice'] == same[plate]['precision'] == same[plate]['recall'] == 100
    assert same[plate]['hd95'] == same[plate]['thickness_error_mm'] == same[plate]['volume_error_pct'] == 0
  printed = capsys.readouterr().out
  assert f"knee_0000.nii.gz: against {labels / 'knee.nii.gz'}: Dice FC {knee['fc']['dice']:.1f} %" in printed
  assert f"HD95 FC {knee['fc']['hd95']:.2f} TC {knee['tc']['hd95']:.2f} mm" in printed
  mean = (knee['fc']['dice'] + knee['tc']['dice'] + 200) / 4
  assert '3D Dice against the labels, 2 scan(s): FC ' in printed
  assert f'mean of FC and TC {mean:.2f} %' in printed
  with open(out / 'scores.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(pathlib.Path(r['scan']).name, r['plate']) for r in rows] == [
      (scan, plate) for scan in ('knee_0000.nii.gz', 'permuted.nii.gz') for plate in ('fc', 'tc')]
  assert float(rows[0]['dice']) == pytest.approx(knee['fc']['dice'], rel=1e-5)
  assert (rows[0]['mask'], rows[0]['labels']) == (str(out / 'knee_0000.nii.gz'), str(labels / 'knee.nii.gz'))
  report = (out / 'report.md').read_text()
  assert f'| mean ± std (2 scans) | {(knee["fc"]["dice"] + 100) / 2:.2f} ± ' in report
  assert '](<bland_altman_thickness.png>)' in report and (out / 'bland_altman_thickness.png').stat().st_size
  predict.predict(_config(), workdir, scans, out, continue_prediction=True)  # no labels: no scores left
  assert not (out / 'scores.csv').exists() and not (out / 'bland_altman_thickness.png').exists()
  records = (out / 'measures').glob('*.json')
  assert not any('scores' in json.loads(path.read_text())['result'] for path in records)
  # Segmented afresh, scored in memory: the same scores, and the slice figure gains a row of the labels.
  fresh = predict.predict(_config(), workdir, scans, tmp_path / 'fresh', labels=labels)
  for result, scores in zip(fresh, (knee, same), strict=True):
    for plate in ('fc', 'tc'):
      assert result['scores'][plate] == pytest.approx(scores[plate], nan_ok=True)
  heights = [matplotlib.image.imread(folder / 'slices' / 'knee_0000.png').shape[0]
             for folder in (out, tmp_path / 'fresh')]
  assert heights[1] > 1.4 * heights[0]
  predict.predict(_config(), workdir, scans, tmp_path / 'fresh', continue_prediction=True)  # kept, unscored
  assert not (tmp_path / 'fresh' / 'scores.csv').exists()

  volumes.save_volume(labels / 'permuted.nii.gz', mask[:, :, :-1], nib.load(permuted).affine)
  _one_line_error(DataError, r'permuted.nii.gz: image shape \(42, 38, 6\) and label map shape \(42, 38, 5\) '
                  'differ', _config(), workdir, scans / 'permuted.nii.gz', tmp_path / 'one.nii.gz',
                  labels=labels / 'permuted.nii.gz')
  _one_line_error(ConfigError, 'would overwrite an input scan or label map', _config(), workdir, scans,
                  labels, labels=labels)
  (labels / 'permuted.nii.gz').unlink()
  _one_line_error(DataError, r'no label map for 1 scan\(s\) \(permuted.nii.gz\)', _config(), workdir, scans,
                  out, labels=labels)
  # nnU-Net's dataset.json, a folder above the label maps, names their labels: labels it names otherwise
  # than data.label_map reads them (SKM-TEA's, medial tibial cartilage 3) are refused before segmenting.
  (tmp_path / 'dataset.json').write_text(json.dumps({'labels': {
      'background': 0, 'femoral cartilage': 2, 'medial tibial cartilage': 3, 'lateral tibial cartilage': 4}}))
  monkeypatch.chdir(labels)  # also where given from inside the labels' folder
  for given in (labels, labels / 'knee.nii.gz', pathlib.Path('knee.nii.gz'), pathlib.Path('.')):
    _one_line_error(ConfigError, "dataset.json names label 3 'medial tibial cartilage', class 2", _config(),
                    workdir, scans / 'knee_0000.nii.gz', tmp_path / 'skm.nii.gz', labels=given)
  assert not (tmp_path / 'skm.nii.gz').exists()


def test_a_header_without_orientation_is_warned_of(run, tmp_path, caplog, monkeypatch):
  """qform and sform codes 0: nibabel's default orientation, which medial and lateral then follow."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  nii = nib.load(canonical)
  unoriented = nib.Nifti1Image(np.asarray(nii.dataobj), None, nii.header)
  unoriented.set_qform(None, code=0)
  unoriented.set_sform(None, code=0)
  nib.save(unoriented, tmp_path / 'unoriented.nii.gz')
  for scan in (canonical, tmp_path / 'unoriented.nii.gz'):
    caplog.clear()
    predict.predict(_config(), workdir, scan, tmp_path / 'mask.nii.gz')
    assert ('gives no orientation (qform and sform codes 0)' in caplog.text) == (scan != canonical)


def test_a_plate_not_found_is_warned_of(run, tmp_path, caplog, capsys, monkeypatch):
  """A mask without femoral or tibial cartilage (a header whose voxel sizes do not follow its voxels makes
  one) is written with a warning naming the plate missing; the plate's volume is 0 and its thickness n/a,
  not 0 mm (which would pull down a cohort's mean)."""
  workdir, canonical, _ = run

  def darker(self, image_SHW):  # no voxel reaches _thresholds' 0.6 of TC
    return _thresholds(self, image_SHW * 0.5)

  for network, missing in ((_thresholds, []), (darker, ['tibial'])):
    monkeypatch.setattr(inference.Network, '__call__', network)
    caplog.clear()
    [result] = predict.predict(_config(), workdir, canonical, tmp_path / 'mask.nii.gz')
    tc = result['regions']['tc']
    assert (tc['volume_mm3'] == 0 and np.isnan(tc['thickness_mean_mm'])) == bool(missing)
    assert ('TC 0 mm^3, mean thickness n/a ->' in capsys.readouterr().out) == bool(missing)
    report = (tmp_path / 'mask_report.md').read_text()
    assert ('| tc | 0 | n/a | n/a | n/a | n/a | n/a | n/a |' in report) == bool(missing)
    assert 'n/a %' not in report
    assert [r.getMessage() for r in caplog.records if 'cartilage found' in r.getMessage()] == [
        f'{canonical}: no {plate} cartilage found: a field of view too small (sagittal slices of 67 x 68 mm, '
        "where a knee MRI's span 120-160 mm), a scan of another joint, or a header whose voxel sizes or axes "
        'do not follow its voxels (an array saved in another axis order than its affine says)? The mask is '
        'written as found' for plate in missing]
  # The same voxels twice as large in the sagittal plane: a knee MRI's field of view.
  nii = nib.load(canonical)
  wide = tmp_path / 'wide.nii.gz'
  nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), nii.affine @ np.diag([1, 2, 2, 1])), wide)
  caplog.clear()
  predict.predict(_config(), workdir, wide, tmp_path / 'wide_mask.nii.gz')
  [warned] = [r.getMessage() for r in caplog.records if 'cartilage found' in r.getMessage()]
  assert warned.startswith(f'{wide}: no tibial cartilage found: a scan of another joint'), warned


def test_plates_dropped_as_specks_are_named(run, tmp_path, caplog, monkeypatch):
  """Plates the network marked only in pieces under the speck floor (a slab of a few slices holds no plate
  whole) are named, with the pieces' volume, before the causes a missing plate otherwise suggests."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  [kept] = predict.predict(_config(min_component_mm3=0, min_component_fraction=0), workdir, canonical,
                           tmp_path / 'kept.nii.gz')
  fc, tc = (kept['regions'][plate]['volume_mm3'] for plate in ('fc', 'tc'))
  assert fc > 0 and tc > 0
  caplog.clear()
  predict.predict(_config(min_component_mm3=1e9), workdir, canonical, tmp_path / 'dropped.nii.gz')
  [warned] = [r.getMessage() for r in caplog.records if 'cartilage found' in r.getMessage()]
  assert warned.startswith(
      f'{canonical}: no femoral or tibial cartilage found: a field of view too small (sagittal slices of 67 '
      f"x 68 mm, where a knee MRI's span 120-160 mm), femoral pieces of {fc:.0f} mm^3 and tibial pieces of "
      f'{tc:.0f} mm^3 in all dropped as specks (predict.min_component_mm3 1e+09; 0 keeps them) in a scan '
      'that spans 18.0 mm from left to right (a slab of a few slices?), a scan of another joint'), warned


def test_a_label_map_given_as_the_scan_is_warned_of(run, tmp_path, caplog, monkeypatch):
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  _, labels, affine = phantom.make_subject(7, shape=(6, 42, 38), spacing=(3.0, 1.6, 1.8))
  volumes.save_volume(tmp_path / 'labels.nii.gz', labels, affine)
  for scan in (canonical, tmp_path / 'labels.nii.gz'):
    caplog.clear()
    predict.predict(_config(), workdir, scan, tmp_path / 'mask.nii.gz')
    warned = [r.getMessage() for r in caplog.records if 'distinct values' in r.getMessage()]
    assert len(warned) == (scan != canonical)
  assert 'holds only 4 distinct values (0, 1, 2, 3): a label map or mask given as the scan?' in warned[0]


def test_a_scan_acquired_in_another_plane_is_warned_of(run, tmp_path, caplog):
  workdir, canonical, _ = run
  nii = nib.load(canonical)
  coronal = tmp_path / 'coronal.nii.gz'  # 5 mm anterior-posterior pixels: coronal slices 5 mm thick
  nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), np.diag([1.6, 5.0, 1.8, 1])), coronal)
  predict.predict(_config(), workdir, canonical, tmp_path / 'canonical_mask.nii.gz')
  assert 'acquired in another plane' not in caplog.text
  predict.predict(_config(), workdir, coronal, tmp_path / 'coronal_mask.nii.gz')
  assert 'coronal.nii.gz: sagittal slices of 5 x 1.8 mm pixels, over 2 times coarser' in caplog.text


def test_a_header_that_turns_the_knee_and_a_flexed_knee_are_caught(tmp_path, caplog):
  """The shipped model on a small real-anatomy knee; on the same voxels with the in-plane axes swapped and
  head-foot flipped under the same header, and on them stored in another axis order under a header that
  takes the stored axes for its own (the voxel sizes right), which the orientation check segments upright,
  their masks the upright file's mask turned, voxel for voxel, saying how the header turns the knee; and on
  the knee rotated by 30 degrees in the sagittal plane, segmented rotated back, its mask the upright one's
  rotated."""
  spacing = (2.0, 0.9, 0.9)
  image, tissue, affine = knee.make_tissues(3, shape=(12, 128, 128), spacing=spacing)
  resliced_affine = affine.copy()  # voxel axes (AP, SI, LR) read as (LR, AP, SI)
  resliced_affine[:3, :3] = affine[:3, :3] / spacing * np.array(spacing)[[1, 2, 0]]
  scans = {'upright': (image, affine),
           'turned': (image.swapaxes(1, 2)[:, ::-1], affine),  # orient(image, (0, True, True, False))
           'resliced': (image.transpose(1, 2, 0), resliced_affine),
           'flexed': (pose.rotate_slices(image, 30, spacing), affine)}
  (tmp_path / 'scans').mkdir()
  for name, (voxels, header_affine) in scans.items():
    nib.save(nib.Nifti1Image(np.ascontiguousarray(voxels), header_affine),
             tmp_path / 'scans' / f'{name}.nii.gz')
  config = pretrained.config_of(pretrained.SHIPPED)
  results = {pathlib.Path(r['input']).name: r for r in predict.predict(
      config, None, tmp_path / 'scans', tmp_path / 'masks', pretrained.SHIPPED)}
  masks = {name: np.asarray(nib.load(tmp_path / 'masks' / f'{name}.nii.gz').dataobj) for name in scans}
  turned = "its anterior the header's superior, its superior the header's posterior"
  resliced = ("its left-right the header's inferior-superior, its anterior the header's right, its superior "
              "the header's anterior")
  assert [(results[f'{name}.nii.gz']['orientation'], results[f'{name}.nii.gz']['rotation_deg'])
          for name in scans] == [('as the header', 0), (turned, 0), (resliced, 0), ('as the header', -30)]
  # The header's sides are another axis's: neither the knee's side nor which half is medial is known.
  assert results['resliced.nii.gz']['laterality'] is None
  assert ("(undecided: the header's left-right axis is not the knee's, so the knee's halves are named "
          'side1 and side2)') in results['resliced.nii.gz']['laterality_text']
  assert {'fc_side1', 'fc_side2', 'tc_side1', 'tc_side2'} <= set(results['resliced.nii.gz']['regions'])
  labels = phantom.LABEL_OF_TISSUE[tissue]
  for k, value, least in ((1, 2, 70), (2, 4, 60)):  # Dice % of the upright knee (81 / 76 measured)
    assert metrics.segmentation_metrics(masks['upright'] == k, labels == value, spacing)['dice'] > least
  np.testing.assert_array_equal(masks['turned'], pose.orient(masks['upright'], (0, True, True, False)))
  np.testing.assert_array_equal(masks['resliced'], masks['upright'].transpose(1, 2, 0))
  for name in scans:  # each thickness map lies on its mask, in the scan's voxel order
    thickness = np.asarray(nib.load(results[f'{name}.nii.gz']['thickness_map']).dataobj)
    np.testing.assert_array_equal(thickness > 0, masks[name] > 0)
  for k, least in ((1, 0.8), (2, 0.6)):  # Dice against the upright mask rotated (TC: a few hundred voxels)
    expected = pose.rotate_slices((masks['upright'] == k).astype(np.float32), 30, spacing) > 0.5
    found = masks['flexed'] == k
    assert 2 * np.sum(expected & found) / (expected.sum() + found.sum()) > least
  warned = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f"{tmp_path / 'scans' / 'turned.nii.gz'}: the knee lies turned against its header "
                          f'({turned}') for m in warned)
  assert any(m.startswith(f"{tmp_path / 'scans' / 'flexed.nii.gz'}: the knee lies rotated in the sagittal "
                          'plane') and 'rotated by -30 degrees' in m for m in warned)
  report = (tmp_path / 'masks' / 'report.md').read_text()
  assert report.count('turned against its header') == 2 and report.count('rotated by -30 degrees') == 1
  # Scored later from the kept masks, each against the labels stored as its voxels are: the scores of the
  # orientation it was segmented in, the upright knee's (the 2D Dice over the knee's sagittal slices).
  stored_labels = {'upright': labels, 'turned': labels.swapaxes(1, 2)[:, ::-1],
                   'resliced': labels.transpose(1, 2, 0), 'flexed': labels}
  for name, voxels in stored_labels.items():
    volumes.save_volume(tmp_path / 'labels' / f'{name}.nii.gz', voxels, scans[name][1])
  scored = {pathlib.Path(r['input']).name: r['scores'] for r in predict.predict(
      config, None, tmp_path / 'scans', tmp_path / 'masks', pretrained.SHIPPED, continue_prediction=True,
      labels=tmp_path / 'labels')}
  for name in ('turned', 'resliced'):
    for plate in ('fc', 'tc'):
      assert scored[f'{name}.nii.gz'][plate] == pytest.approx(scored['upright.nii.gz'][plate], nan_ok=True)


def test_isotropic_voxels_have_their_left_right_axis_questioned(tmp_path):
  """The shipped model on a small real-anatomy knee of isotropic voxels, whose left-right axis the voxel
  sizes do not name: kept as its header says, and stored in another axis order under a header that takes
  the stored axes for its own, segmented with its own left-right axis, the mask the first's transposed."""
  spacing = (0.9, 0.9, 0.9)
  image, tissue, affine = knee.make_tissues(3, shape=(28, 128, 128), spacing=spacing)
  (tmp_path / 'scans').mkdir()
  for name, voxels in (('upright', image), ('stored', image.transpose(2, 0, 1))):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(voxels), affine), tmp_path / 'scans' / f'{name}.nii.gz')
  results = {pathlib.Path(r['input']).name: r for r in predict.predict(
      pretrained.config_of(pretrained.SHIPPED), None, tmp_path / 'scans', tmp_path / 'masks',
      pretrained.SHIPPED)}
  assert results['upright.nii.gz']['orientation'] == 'as the header'
  assert results['stored.nii.gz']['orientation'].startswith("its left-right the header's anterior-posterior")
  masks = {name: np.asarray(nib.load(tmp_path / 'masks' / f'{name}.nii.gz').dataobj)
           for name in ('upright', 'stored')}
  np.testing.assert_array_equal(masks['stored'], masks['upright'].transpose(2, 0, 1))
  labels = phantom.LABEL_OF_TISSUE[tissue]
  for k, value, least in ((1, 2, 70), (2, 4, 60)):  # Dice % (83 / 78 measured)
    assert metrics.segmentation_metrics(masks['upright'] == k, labels == value, spacing)['dice'] > least


def test_a_sagittal_rotation_turns_millimetres_on_pixels_of_two_sizes():
  """0.5 x 1 mm pixels: a point 5 mm from the centre along axis 1 (10 pixels) turned by 90 degrees lies 5 mm
  from it along axis 2 (5 pixels)."""
  array = np.zeros((1, 41, 21), np.float32)
  array[0, 30, 10] = 1.0
  turned = pose.rotate_slices(array, 90, (1.0, 0.5, 1.0))
  _, h, w = np.unravel_index(np.argmax(turned), turned.shape)
  assert (h, abs(w - 10)) == (20, 5) and turned.max() == pytest.approx(1.0)


def test_slices_of_too_few_pixels_at_the_networks_pixel_do_not_fit():
  """A header in metres read as mm: a 384-pixel slice of 0.0004 "mm" is well under one network pixel."""
  assert inference.slices_fit((384, 384), (0.36, 0.36), (0.36, 0.36))
  assert not inference.slices_fit((384, 384), (0.0004, 0.0004), (0.36, 0.36))
  assert not inference.slices_fit((15, 384), (0.36, 0.36), (0.36, 0.36))


def test_the_weights_digest_covers_the_batch_statistics():
  """A continued batch keeps masks of the same weights only: BatchNorm's statistics are weights too."""
  def digest(mean):
    state = steps.TrainState(step=0, params={'w': np.ones(3, np.float32)},
                             batch_stats={'mean': np.full(3, mean, np.float32)}, opt_state=())
    return inference.Network(tiny.get_config(), None, state, parallel.make_mesh()).weights_sha256()

  assert digest(0.0) == digest(0.0) != digest(0.5)


def test_a_way_the_header_finds_no_sure_cartilage_in_is_said_in_words():
  """A knee stored in another axis order than its header's may leave the network no sure cartilage the
  header's way: the warning says so rather than "infx surer"."""
  assert pose.surer(float('inf')) == 'sure of cartilage only'
  assert pose.surer(46.94) == '46.9x surer of cartilage'


def test_a_header_without_a_position_decides_no_side():
  """A file without a pose (OAI-ZIB's MetaImage files: the first voxel at the origin) tells no side, however
  far from the midline its centre then lies; a scanner's position of 60 mm to the right or the left does,
  and one 6 mm from the midline does not."""
  affine = np.diag([0.7, 0.4, 0.4, 1.0])
  side, why = predict.decide_laterality(nib.Nifti1Image(np.zeros((160, 5, 6), np.float32), affine), {}, None)
  assert side is None and why.startswith('undecided: the header puts the first voxel at the origin')
  affine[0, 3] = 60.0
  right = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
  side, why = predict.decide_laterality(right, {}, None)
  assert side == 'R' and why.startswith("from the position: centred 61 mm to the patient's right")
  for first_voxel_x, want_side, want_why in (
      (-60.0, 'L', "from the position: centred 59 mm to the patient's left"),
      (20.0, 'R', "from the position: centred 21 mm to the patient's right"),
      (5.0, None, 'undecided: the scan is centred 6 mm from the midline (RAS x)')):
    affine[0, 3] = first_voxel_x
    side, why = predict.decide_laterality(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), {}, None)
    assert side == want_side and why.startswith(want_why)
  # The centre is the middle voxel's: 4 slices of 4 mm from x = 60 lie at 60-72 mm, centred at 66.
  affine = np.diag([4.0, 0.4, 0.4, 1.0])
  affine[0, 3] = 60.0
  side, why = predict.decide_laterality(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), {}, None)
  assert why.startswith("from the position: centred 66 mm to the patient's right")


def test_the_position_is_read_in_the_headers_unit():
  """A header in metres: a first voxel 0.06 m right puts the volume's centre 61 mm right, a right knee."""
  affine = np.diag([0.0007, 0.0004, 0.0004, 1.0])
  affine[0, 3] = 0.06
  nii = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
  nii.header.set_xyzt_units('meter')
  side, why = predict.decide_laterality(nii, {}, None)
  assert side == 'R' and why.startswith("from the position: centred 61 mm to the patient's right")


def test_a_laterality_tag_against_the_position_decides_with_a_warning(caplog):
  affine = np.diag([0.7, 0.4, 0.4, 1.0])
  affine[0, 3] = 60.0
  right = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
  tag = {'laterality_from': 'the DICOM Laterality tag'}
  side, why = predict.decide_laterality(right, tag | {'laterality': 'R'}, None)
  assert (side, why) == ('R', 'from the DICOM Laterality tag')
  assert not caplog.records
  side, why = predict.decide_laterality(right, tag | {'laterality': 'L'}, None)
  assert (side, why) == ('L', "from the DICOM Laterality tag, against its position (centred 61 mm to the "
                              "patient's right)")
  assert caplog.records[0].getMessage() == ("the DICOM Laterality tag says left knee, the scan's position "
                                            "centred 61 mm to the patient's right: the named side is taken; "
                                            'pass --laterality if it is wrong')


def test_a_dcm2niix_sidecar_names_the_side_of_a_volume_file(run, tmp_path, monkeypatch, caplog):
  """dcm2niix writes the series description, not the Laterality tag, into the JSON beside its NIfTI: OAI's
  SAG_3D_DESS_LEFT names a left knee, also against a position on the patient's right, with the warning."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  shutil.copy(canonical, tmp_path / 'oai.nii.gz')
  (tmp_path / 'oai.json').write_bytes(b'\xef\xbb\xbf{"SeriesDescription": "SAG_3D_DESS_LEFT"}')  # with a BOM
  [result] = predict.predict(_config(), workdir, tmp_path / 'oai.nii.gz', tmp_path / 'oai_mask.nii.gz')
  assert result['laterality'] == 'L'
  assert "from the series description 'SAG_3D_DESS_LEFT' of oai.json" in result['laterality_text']
  caplog.clear()
  affine = np.diag([0.7, 0.4, 0.4, 1.0])
  affine[0, 3] = 60.0
  scan = tmp_path / 'knee.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine), scan)
  (tmp_path / 'knee.json').write_text('{"SeriesDescription": "SAG_3D_DESS_LEFT", "Modality": "MR"}')
  nii, info = predict._read(scan, None)
  side, why = predict.decide_laterality(nii, info, None)
  assert (side, why) == ('L', "from the series description 'SAG_3D_DESS_LEFT' of knee.json, against its "
                              "position (centred 61 mm to the patient's right)")
  assert caplog.records[0].getMessage().startswith("the series description 'SAG_3D_DESS_LEFT' of knee.json "
                                                   'says left knee')
  (tmp_path / 'knee.json').write_bytes(b'{"SeriesDescription": "SAG_3D_DESS_LEFT GEN\xc9RIQUE"}')  # Latin-1
  assert predict._read(scan, None)[1]['laterality'] == 'L'
  (tmp_path / 'knee.json').write_text('["not", "a", "sidecar"]')
  nii, info = predict._read(scan, None)
  assert info == {} and predict.decide_laterality(nii, info, None)[0] == 'R'
  assert caplog.records[-1].getMessage().endswith('the knee side is not read from it')


def test_continuing_segments_again_a_scan_whose_sidecar_came_later(run, tmp_path, monkeypatch):
  """A sidecar written after a scan was segmented names its side: --continue_prediction segments it again,
  and keeps it the time after."""
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  scans, out = tmp_path / 'scans', tmp_path / 'out'
  scans.mkdir()
  shutil.copy(canonical, scans / 'knee.nii.gz')
  [first] = predict.predict(_config(), workdir, scans, out)
  side = 'L' if first['laterality'] != 'L' else 'R'
  (scans / 'knee.json').write_text(f'{{"SeriesDescription": "SAG_3D_DESS_{reports.SIDES[side].upper()}"}}')
  [second] = predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert second['laterality'] == side
  written = (out / 'knee.nii.gz').stat().st_mtime_ns
  [third] = predict.predict(_config(), workdir, scans, out, continue_prediction=True)
  assert third['laterality'] == second['laterality'] and (out / 'knee.nii.gz').stat().st_mtime_ns == written


def test_a_batch_holds_what_is_named_as_a_scan_less_hidden_files_and_other_channels(tmp_path, caplog):
  """nnU-Net's other channels (<id>_0001 beside <id>_0000, for every id) are left out with a warning; scans
  numbered scan_0000, scan_0001 or by visit (<id>_0000, <id>_0012) are not; a broken link or a folder named
  as a scan is one (its check fails it), a hidden file (macOS's ._ copies) is not."""
  folders = {'channels': ('a_0000', 'a_0001', 'b_0000', 'b_0001', '._a_0000'),
             'numbered': ('scan_0000', 'scan_0001'),
             'visits': ('9001104_0000', '9001104_0012', '9002116_0000', '9002116_0012')}
  for folder, names in folders.items():
    (tmp_path / folder).mkdir()
    for name in names:
      (tmp_path / folder / f'{name}.nii.gz').touch()
  (tmp_path / 'numbered' / 'gone.nii.gz').symlink_to(tmp_path / 'missing.nii.gz')
  (tmp_path / 'numbered' / 'folder.nii.gz').mkdir()
  (tmp_path / 'numbered' / 'series 2').symlink_to(tmp_path / 'unmounted')  # a DICOM folder's link
  scans = {folder: [p.name for p, _ in predict._inputs(tmp_path / folder, tmp_path / 'out')[0]]
           for folder in folders}
  assert ('1 link(s) to what is gone left out (a series folder moved or unmounted?): series 2: a broken link '
          f'(to {tmp_path}/unmounted)') in caplog.text
  for given in (predict._inputs, lambda gone, _: predict._label_files([], gone, True)):
    with pytest.raises(DataError, match=r'numbered/series 2: a broken link \(to .*/unmounted\)$'):
      given(tmp_path / 'numbered' / 'series 2', tmp_path / 'out')
  assert scans == {'channels': ['a_0000.nii.gz', 'b_0000.nii.gz'],
                   'numbered': ['folder.nii.gz', 'gone.nii.gz', 'scan_0000.nii.gz', 'scan_0001.nii.gz'],
                   'visits': [f'{name}.nii.gz' for name in folders['visits']]}
  assert "2 file(s) read as other channels of nnU-Net's <id>_0000 scans" in caplog.text
  assert 'left out (rename scans to segment them): a_0001.nii.gz, b_0001.nii.gz' in caplog.text
  for name, message in (('gone', r'gone\.nii\.gz: a broken link \(to .*missing\.nii\.gz\)'),
                        ('folder', r'folder\.nii\.gz: a folder named as a volume file')):
    with pytest.raises(DataError, match=message):
      predict._check_files(tmp_path / 'numbered' / f'{name}.nii.gz', None, None)
  write_series(tmp_path / 'T2_SAG.nii')  # a DICOM series' folder, whatever its name
  predict._check_files(tmp_path / 'T2_SAG.nii', None, None)


def test_orient_and_unorient_are_inverse_in_all_24_orientations():
  array = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)
  seen = set()
  for axis, *in_plane in itertools.product(range(3), *[(False, True)] * 3):
    orientation = (axis, *in_plane)
    oriented = pose.orient(array, orientation)
    assert oriented.shape[:3] == pose.oriented_spacing(array.shape[:3], orientation)
    assert oriented.shape[3] == 2
    np.testing.assert_array_equal(pose.unorient(oriented, orientation), array)
    seen.add((oriented.shape, oriented.tobytes()))
  assert len(seen) == 24


def test_an_identity_affine_is_warned_of(run, tmp_path, caplog, monkeypatch):
  workdir, canonical, _ = run
  monkeypatch.setattr(inference.Network, '__call__', _thresholds)
  lost = tmp_path / 'lost.nii.gz'  # the geometry lost: 1 mm voxels, axes as stored
  nib.save(nib.Nifti1Image(np.asarray(nib.load(canonical).dataobj), np.eye(4)), lost)
  for scan in (canonical, lost):
    caplog.clear()
    predict.predict(_config(), workdir, scan, tmp_path / 'mask.nii.gz')
    warned = [r.getMessage() for r in caplog.records if 'affine is the identity' in r.getMessage()]
    assert len(warned) == (scan == lost)
  assert warned[0].startswith(f"{lost}: the header's voxel-to-world affine is the identity (1 mm voxels")


def test_small_components_are_dropped_per_class():
  classes = np.zeros((10, 40, 40), np.uint8)
  classes[2:8, 5:25, 5:10] = 1  # a plate: 6 x 20 x 5 voxels of 1 mm^3 = 600 mm^3
  classes[2:8, 30:35, 5:10] = 2  # a tibial plate of 150 mm^3
  classes[1, 36, 36] = 1  # specks on skin
  classes[9, 0:2, 0:2] = 2
  classes[1, 25, 10] = 1  # touching the plate's corner (2, 24, 9) only: a component of its own
  kept = predict.remove_small_components(classes, (1.0, 1.0, 1.0), 100.0, 0.0)
  expected = classes.copy()
  expected[1, 36, 36] = 0
  expected[9, 0:2, 0:2] = 0
  expected[1, 25, 10] = 0
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(predict.remove_small_components(classes, (1.0, 1.0, 1.0), 0.0, 0.0), classes)
  # Millimetres, not voxels: at 2 mm voxels the 150-voxel plate holds 1200 mm^3, the 4-voxel speck 32.
  assert (predict.remove_small_components(classes, (2.0, 2.0, 2.0), 100.0, 0.0) == 2).sum() == 150
  # A component of exactly the floor is not smaller than it: the 150 mm^3 plate stays at a floor of 150.
  assert (predict.remove_small_components(classes, (1.0, 1.0, 1.0), 150.0, 0.0) == 2).sum() == 150


def test_components_small_beside_their_class_largest_are_dropped():
  """A ghost of the femoral plate (over the absolute floor, a twentieth of the plate) goes at a fraction
  of 0.1; two tibial plates of similar size stay, and a fraction of 0 keeps the ghost."""
  classes = np.zeros((10, 60, 40), np.uint8)
  classes[1:9, 5:30, 5:15] = 1  # a femoral plate of 2000 mm^3
  classes[4:6, 50:55, 5:15] = 1  # its ghost: 100 mm^3, 5 %
  classes[2:8, 35:40, 5:15] = 2  # lateral and medial tibial plates, 300 and 240 mm^3
  classes[2:8, 35:39, 25:35] = 2
  kept = predict.remove_small_components(classes, (1.0, 1.0, 1.0), 50.0, 0.1)
  expected = classes.copy()
  expected[4:6, 50:55, 5:15] = 0
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(predict.remove_small_components(classes, (1.0, 1.0, 1.0), 50.0, 0.0), classes)
  # The fraction is of the largest component, not of the class: a tibial fragment of 60 mm^3 is 20 % of
  # the larger plate (kept at 0.15), 11 % of the class.
  classes[2:8, 50:55, 25:27] = 2
  assert (predict.remove_small_components(classes, (1.0, 1.0, 1.0), 50.0, 0.15) == 2).sum() == 600


def test_figure_slices_cross_the_cartilage_at_its_quartiles():
  classes = np.zeros((40, 8, 8), np.uint8)
  classes[10:20, 2:4, 2:4] = 1  # cartilage in slices 10-19 only, evenly
  assert figures.cartilage_slices(classes) == [12, 14, 17]
  classes[30:32] = 2  # two slices of 64 voxels outweigh the ten of 4: the quartiles move to them
  assert figures.cartilage_slices(classes) == [30, 31]  # each slice once
  assert figures.cartilage_slices(np.zeros_like(classes)) == [9, 19, 29]  # none: the volume's quartiles


def test_offset_grids_sample_where_the_network_pixels_lie():
  ramp = np.broadcast_to(np.arange(16, dtype=np.float32)[None, :, None], (1, 16, 3))  # value = coordinate
  down = inference._resize(ramp, (8, 3), (1.0, 0.0))  # half a pixel of the 2x coarser grid
  np.testing.assert_allclose(down[0, :7, 0], 2 * np.arange(7) + 1.5)  # the last one clips at the edge
  back = inference._resize(down, (16, 3), (-0.5, 0.0))
  np.testing.assert_allclose(back[0, 2:14, 0], np.arange(2, 14))


class _Step:
  """A stand-in network for one class boundary: foreground where the normalised image is above half."""
  stride = 4
  batch_size = 8
  calls = 0

  def __call__(self, image_SHW):
    self.calls += 1
    return np.stack([image_SHW < 0.5, image_SHW >= 0.5], -1).astype(np.float32)


def _segment(network, image, spacing, pixel, subpixel_tta, slice_sigma_mm):
  return predict.to_classes(inference.class_probabilities(network, image, spacing, pixel, subpixel_tta,
                                                        slice_sigma_mm), 1.0)


def test_an_orientation_is_taken_only_where_it_beats_the_headers_by_the_margin():
  """Share 0 is the header's way: another must be 1.5 times surer and above the floor of 1e-3."""
  assert pose._beats(np.array([0.1, 0.14])) == (0, 1.0)
  assert pose._beats(np.array([0.1, 0.16, 0.12])) == (1, pytest.approx(1.6))
  assert pose._beats(np.array([0.0, 5e-4])) == (0, 1.0)
  assert pose._beats(np.array([0.0, 0.2])) == (1, float('inf'))


def test_resampled_size_rounds_to_the_nearest_pixel():
  assert inference.resampled_size((100, 101), (0.5, 0.5), (0.3, 0.3)) == (167, 168)  # 166.7 and 168.3
  assert inference.resampled_size((3, 400), (0.1, 0.5), (1.0, 0.5)) == (1, 400)  # never below one pixel


def test_the_report_and_csv_give_each_regions_measures_in_their_units(tmp_path, monkeypatch):
  """The Markdown table in mm, mm^3, mm^2 and the thin fraction in %; the CSV as measured; a scan read as
  its header says it and one turned against it; the figures linked; a scored scan's row of scores."""
  row = {'volume_mm3': 1234.0, 'thickness_mean_mm': 2.0, 'thickness_median_mm': 1.9, 'thickness_p95_mm': 3.1,
         'thickness_max_mm': 4.0, 'area_mm2': 617.0, 'thin_fraction': 0.25}
  results = [{'case': name, 'input': f'{name}.nii.gz', 'output': str(tmp_path / f'{name}.nii.gz'),
              'regions': {'fc': row, 'tc': row | {'thin_fraction': 0.0}},
              'thickness_png': str(tmp_path / 'thickness' / f'{name}.png'),
              'slices_png': str(tmp_path / 'slices' / f'{name}.png')} for name in ('a', 'knee b')]
  results[0] |= {'laterality': 'R', 'laterality_text': 'right knee', 'orientation': reports.AS_THE_HEADER,
                 'rotation_deg': 0}
  results[1] |= {'laterality': 'L', 'laterality_text': 'left knee', 'rotation_deg': -30,
                 'orientation': "its anterior the header's superior", 'labels': 'knee b_labels.nii.gz',
                 'scores': {plate: {'dice': dice, 'hd95': hd95, 'thickness_error_mm': error,
                                    'thickness_true_mm': 2.0, 'thickness_pred_mm': 2.0 + error}
                            for plate, dice, hd95, error in (('fc', 80.0, 1.0, 0.1),
                                                             ('tc', 60.0, 2.0, -0.2))}}
  paths = {name: tmp_path / file for name, file in (('measures', 'measures.csv'), ('report', 'report.md'),
                                                    ('scores', 'scores.csv'), ('bland_altman', 'ba.png'))}
  plotted, plot = [], figures.plot_bland_altman
  monkeypatch.setattr(figures, 'plot_bland_altman', lambda *args: (plotted.append(args), plot(*args)))
  reports.write_reports(results, paths, 'step 7 of `run`')
  assert [tuple(a) for a in plotted[0][:3]] == [(2.0, 2.0), (2.1, 1.8), ('FC', 'TC')]  # truth first
  report = paths['report'].read_text()
  assert '| fc | 1234 | 2.00 | 1.90 | 3.10 | 4.00 | 617 | 25.0 % |' in report
  assert '| tc | 1234 | 2.00 | 1.90 | 3.10 | 4.00 | 617 | 0.0 % |' in report
  assert '\n\nMasks made by step 7 of `run`.\n\n' in report
  assert f"Mask `{tmp_path / 'a.nii.gz'}`; right knee.\n" in report
  assert (f"Mask `{tmp_path / 'knee b.nii.gz'}`; left knee; turned against its header (its anterior the "
          "header's superior); segmented with its sagittal slices rotated by -30 degrees.\n") in report
  assert '![thickness map of a.png](<thickness/a.png>)' in report
  assert '![sagittal slices of knee b.png](<slices/knee b.png>)' in report  # a space, which ends a bare link
  assert '![Bland-Altman plot of mean thickness, FC and TC of every scan](<ba.png>)' in report
  assert '| knee b.nii.gz | 80.00 | 60.00 | 70.00 | 1.00 | 2.00 | 0.10 | -0.20 |' in report
  rows = list(csv.DictReader(paths['measures'].open()))
  assert [(r['laterality'], r['region'], r['thin_fraction'], r['area_mm2']) for r in rows] == [
      ('right', 'fc', '0.25', '617.0'), ('right', 'tc', '0.0', '617.0'), ('left', 'fc', '0.25', '617.0'),
      ('left', 'tc', '0.0', '617.0')]
  assert [r['case'] for r in rows] == ['a', 'a', 'knee b', 'knee b']
  # The CSV keeps full precision, as evaluate's per_case.csv does: 12345.678901234 mm^3 reads back the same.
  results[0]['regions']['fc'] = row | {'volume_mm3': 12345.678901234}
  reports.write_reports(results, paths, 'step 7 of `run`')
  assert float(next(csv.DictReader(paths['measures'].open()))['volume_mm3']) == 12345.678901234


def test_undefined_scores_read_n_a_and_a_mean_says_how_many_scans_it_averages(capsys):
  """A plate empty in a scan's labels has no HD95 nor thickness error: n/a in the printed line and in the
  report's row, and the report's mean of such a column says how many scans define it."""
  def scores(hd95: float, error: float) -> dict:
    return {'dice': 80.0, 'hd95': hd95, 'thickness_error_mm': error}

  scored = [{'input': f'{name}.nii.gz', 'labels': f'{name}_labels.nii.gz',
             'scores': {'fc': scores(1.0, 0.1), 'tc': scores(hd95, error)}}
            for name, hd95, error in (('a', 2.0, -0.2), ('b', np.nan, np.nan), ('c', 4.0, 0.2))]
  lines = reports.score_lines(scored)
  assert '| b.nii.gz | 80.00 | 80.00 | 80.00 | 1.00 | n/a | 0.10 | n/a |' in lines
  assert ('| mean ± std (3 scans) | 80.00 ± 0.00 | 80.00 ± 0.00 | 80.00 ± 0.00 | 1.00 ± 0.00 | 3.00 ± 1.41 '
          '(2 of 3 scans) | 0.10 ± 0.00 | 0.00 ± 0.28 (2 of 3 scans) |') in lines
  reports.print_scores(pathlib.Path('b.nii.gz'), scored[1])
  assert capsys.readouterr().out == ('b.nii.gz: against b_labels.nii.gz: Dice FC 80.0 % TC 80.0 %, HD95 FC '
                                     '1.00 TC n/a mm, mean thickness error FC +0.10 TC n/a mm\n')


def test_to_classes_weighs_the_background():
  probabilities = np.array([[0.4, 0.55, 0.05], [0.2, 0.1, 0.7], [0.5, 0.4, 0.1]], np.float32)
  np.testing.assert_array_equal(predict.to_classes(probabilities, 1.0), [1, 2, 0])
  np.testing.assert_array_equal(predict.to_classes(probabilities, 2.0), [0, 2, 0])
  np.testing.assert_array_equal(predict.to_classes(probabilities, 0.5), [1, 2, 1])
  # Ties go to the lower class, as np.argmax gives them; any shape of (..., K) is the weighted argmax.
  ties = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]], np.float32)
  np.testing.assert_array_equal(predict.to_classes(ties, 1.0), [0, 1, 0])
  volume = np.random.default_rng(0).dirichlet(np.ones(3), size=(4, 5, 6)).astype(np.float32)
  for weight in (1.0, 1.5):
    np.testing.assert_array_equal(predict.to_classes(volume, weight),
                                  np.argmax(volume * np.float32([weight, 1.0, 1.0]), axis=-1))


@pytest.mark.parametrize('edge', range(3, 12))
def test_subpixel_tta_places_edges_to_the_input_pixel(edge):
  """At a network pixel twice the scan's, an edge at an odd pixel falls between two network pixels: one grid
  moves it by a pixel, the four half-pixel grids put it back."""
  image = np.zeros((1, 16, 16), np.float32)
  image[:, edge:] = 100.0
  for subpixel_tta, expected, grids in ((True, edge, 4), (False, edge - edge % 2, 1)):
    network = _Step()
    classes = _segment(network, image, (1.0, 0.5, 0.5), (1.0, 1.0), subpixel_tta, 0.0)
    np.testing.assert_array_equal(classes[0, :, 8], np.arange(16) >= expected)
    assert network.calls == grids


def test_subpixel_tta_is_one_grid_where_the_network_pixels_are_the_scans():
  network = _Step()
  image = np.arange(16 * 12, dtype=np.float32).reshape(1, 16, 12)
  classes = _segment(network, image, (1.0, 1.0, 1.0), (1.0, 1.0), True, 0.0)
  np.testing.assert_array_equal(classes[0], np.arange(16 * 12).reshape(16, 12) >= 16 * 12 / 2)
  assert network.calls == 1


def test_a_named_scan_logs_how_far_its_slices_are(monkeypatch, caplog):
  """Every progress.EVERY_S seconds (here at every batch of the network's 8 slices) a named scan's status
  line: slices segmented over all sampling grids, with the ETA; an unnamed one (the pose check's) is quiet."""
  monkeypatch.setattr(inference, 'EVERY_S', 0.0)
  image = np.arange(20 * 16 * 16, dtype=np.float32).reshape(20, 16, 16)
  with caplog.at_level(logging.INFO):
    unnamed = _segment(_Step(), image, (1.0, 1.0, 1.0), (1.0, 1.0), True, 0.0)
    assert not caplog.records
    named = predict.to_classes(inference.class_probabilities(
        _Step(), image, (1.0, 1.0, 1.0), (1.0, 1.0), True, 0.0, 'knee.nii.gz'), 1.0)
  np.testing.assert_array_equal(named, unnamed)
  assert [re.sub(r' \(spent.*', '', r.getMessage()) for r in caplog.records] == [
      f'knee.nii.gz: slices segmented {n}/20' for n in (8, 16, 20)]
  assert 'ETA 00:00:00' in caplog.records[-1].getMessage()
  caplog.clear()
  with caplog.at_level(logging.INFO):  # pixels of 0.5 mm for a network of 1 mm ones: four grids counted
    inference.class_probabilities(_Step(), image, (1.0, 0.5, 0.5), (1.0, 1.0), True, 0.0, 'knee.nii.gz')
  lines = [r.getMessage() for r in caplog.records]
  assert [re.sub(r' \(spent.*', '', m) for m in lines if m.startswith('knee')] == [
      f'knee.nii.gz: slices segmented (4 sampling grids each) {20 * grid + n}/80'
      for grid in range(4) for n in (8, 16, 20)]


def test_slice_smoothing_fills_a_one_slice_gap_drops_a_one_slice_speck_and_keeps_the_plate_ends():
  """Cartilage in slices 2-11 of 16 (0.7 mm apart, as OAI-ZIB's) but missed in slice 6, and a speck in slice
  14 alone."""
  image = np.zeros((16, 8, 8), np.float32)
  image[2:12, 2:6, 2:6] = 100.0
  image[6] = 0.0
  image[14, 3:5, 3:5] = 100.0
  truth = np.zeros(image.shape, bool)
  truth[2:12, 2:6, 2:6] = True
  for sigma_mm, expected in ((0.0, image > 50), (1.0, truth)):
    classes = _segment(_Step(), image, (0.7, 2.0, 2.0), None, False, sigma_mm)
    np.testing.assert_array_equal(classes == 1, expected, err_msg=f'sigma {sigma_mm} mm')


def test_a_config_of_ones_own_beside_a_model_file_takes_the_files_pixel_size(tmp_path, monkeypatch):
  """main.py's --config beside --weights, from Python: predict.predict(eas.get_config('knee'), None, scan,
  mask, SHIPPED) predicts at the model file's pixel size, which the config leaves unset (a TypeError after
  the model loaded before); the config given is left as it was."""
  scan = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 48, 48), np.float32), np.eye(4)), scan)
  loaded = []

  class Loaded(Exception):  # what the network would do is not this test's
    pass

  def load_network(config, workdir, model_file=None):
    loaded.append(config)
    raise Loaded

  monkeypatch.setattr(predict, 'load_network', load_network)
  config = eas.get_config('knee')
  with pytest.raises(Loaded):
    predict.predict(config, None, scan, tmp_path / 'mask.nii.gz', pretrained.SHIPPED)
  assert tuple(loaded[0].predict.spacing) == tuple(pretrained.read_meta(pretrained.SHIPPED)['pixel_mm'])
  assert config.to_dict() == eas.get_config('knee').to_dict()


def test_a_bad_laterality_or_no_model_is_refused_before_any_work(tmp_path):
  """From Python, where main.py's flags do not check them: a laterality other than 'R' or 'L' (it ended in a
  KeyError after the segmentation, the mask written and no reports), and neither a model file nor a
  workdir."""
  with pytest.raises(ConfigError, match=r"^laterality: expected 'R', 'L' or None, got 'left'$"):
    predict.predict(pretrained.config_of(pretrained.SHIPPED), None, tmp_path / 'scan.nii.gz',
                    tmp_path / 'mask.nii.gz', pretrained.SHIPPED, laterality='left')
  with pytest.raises(ConfigError, match=r'^predict: expected a model file \(model_file=, e\.g\. '
                     r'pretrained\.SHIPPED\) or the workdir of a training \(workdir=\)$'):
    predict.predict(default.get_config(), None, tmp_path / 'scan.nii.gz', tmp_path / 'mask.nii.gz')
  assert not list(tmp_path.iterdir())


def test_a_scan_whose_outputs_names_would_be_too_long_is_refused_before_any_work(tmp_path, monkeypatch):
  """A legal scan name of 240 characters: its thickness map's name would pass the file system's 255 bytes
  (an OSError after the segmentation, the batch's other scans never segmented, before)."""
  monkeypatch.setattr(predict, 'load_network', lambda *args: pytest.fail('the model was loaded'))
  scan = tmp_path / ('k' * 240 + '.nii.gz')
  nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 48, 48), np.float32), np.eye(4)), scan)
  with pytest.raises(DataError, match=rf"^{scan}: its output k+_thickness\.nii\.gz would be named in 257 "
                     'bytes, over the 255 a file system allows; give the scan a shorter name$'):
    predict.predict(pretrained.config_of(pretrained.SHIPPED), None, scan, tmp_path / 'out' / scan.name,
                    pretrained.SHIPPED)


def test_a_mask_named_with_a_suffix_in_mixed_case_is_refused_before_any_work(tmp_path):
  """nibabel writes mask.Nii.gz as mask.nii.gz: the rename of the finished file failed, after the
  segmentation."""
  scan = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 48, 48), np.float32), np.eye(4)), scan)
  with pytest.raises(ConfigError, match=r'^--output=.*mask\.Nii\.gz: write its suffix in one case, '):
    predict.predict(pretrained.config_of(pretrained.SHIPPED), None, scan, tmp_path / 'mask.Nii.gz',
                    pretrained.SHIPPED)
  assert list(tmp_path.iterdir()) == [scan]
