"""Segments new knee MRI volumes (NIfTI, MetaImage or NRRD files, DICOM series; any voxel order and in-plane
size) with a trained checkpoint and writes uint8 cartilage masks in the input's voxel grid (its orientation
checked against the image); decides the knee's laterality and reports volume, thickness and area per plate
and compartment (CSV and Markdown), with a thickness map of each scan (NIfTI and PNG) and a figure of its
prediction on three sagittal slices; scores the masks against expert labels when given."""

import collections
import contextlib
import fcntl
import json
import os
import pathlib
import re
import time
from collections.abc import Iterator, Sequence

import ml_collections
import nibabel as nib
import numpy as np
from absl import logging
from scipy import ndimage

from easunet_jax import (
  atomic,
  config_check,
  evaluate,
  figures,
  inference,
  measures,
  metrics,
  parallel,
  pose,
  pretrained,
  reports,
  steps,
)
from easunet_jax.data import dicom, pipeline, volumes
from easunet_jax.errors import ConfigError, DataError, one_line
from easunet_jax.progress import Progress

# Written value of each training class (background, FC, TC).
LABEL_VALUES = {'compact': (0, 1, 2), 'oai-zib': (0, *volumes.OAI_ZIB_CARTILAGE.values())}
_CANONICAL = nib.orientations.axcodes2ornt('RAS')
# A knee scanned this far (mm) to one side of the scanner's midline (x = 0) is taken for that side's knee.
_SIDE_MIN_MM = 10.0
# A scan whose sagittal slices have pixels this many times coarser than the network's along an axis was
# acquired in another plane (its slice thickness lies in the sagittal plane): the masks will be poor.
_COARSE_PIXEL_RATIO = 2.0
# A knee MRI's sagittal field of view spans 120-160 mm (the shipped model learnt 140 mm); where one side of
# it is under this, a plate not found may be cropped away or lack the bones around it the network reads.
_SMALL_FOV_MM = 80.0
# A scan this narrow from left to right (a knee's plates span 60-90 mm) is a slab of a few sagittal slices.
_SLAB_MM = 40
# The version of what predict makes of a scan (mask, measures, thickness map) with a given model and
# settings, recorded with each scan's result: raise it with any change to the code that makes them otherwise,
# so that --continue_prediction segments the scans an earlier version did again instead of keeping their
# results. 1: the results that record none.
RESULT_VERSION = 2


def _mask_name(scan: pathlib.Path) -> str:
  """A NIfTI scan's mask keeps its name, the suffix lower-case (nibabel writes .nii.gz and .NII.GZ but
  fails on mixed case); a MetaImage's or NRRD's is NIfTI (what the masks are written as)."""
  stem = volumes.volume_stem(scan.name)
  suffix = scan.name[len(stem):].lower()
  return stem + (suffix if suffix in volumes.NIFTI_SUFFIXES else '.nii.gz')


def _inputs(input_path: str | pathlib.Path, output_path: str | pathlib.Path, series: str | None = None
            ) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], bool]:
  """((scan, mask file) pairs, whether they are a batch written into the directory `output_path`).

  A scan is a NIfTI, MetaImage or NRRD file or a folder of DICOM files (one series is read from it,
  `dicom.read_series`, its subfolders searched too). A directory holding DICOM files and no volume file is
  one scan, and so is a directory without volume files given `series` (--series: one series of its tree).
  Any other directory is a batch of its volume files, masks of the same names (a MetaImage's or NRRD's as
  <name>.nii.gz), and of its subfolders that hold DICOM files, masks named <subfolder>.nii.gz; DICOM files
  beside its volume files are not read, with a warning. A batch of one scan (a series
  exported into a subfolder) with `output_path` naming a NIfTI file is that scan; of more, an error.
  """
  source, target = pathlib.Path(input_path), pathlib.Path(output_path)
  volumes.check_not_broken_link(source)
  if not source.exists():
    raise DataError(f'{source}: no such input file or directory')

  def single(scan: pathlib.Path, name: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    to_folder = target.is_dir() or not target.name.lower().endswith(volumes.NIFTI_SUFFIXES)
    if to_folder and volumes.volume_stem(target.name) and not target.is_dir():
      raise ConfigError(f'--output={target}: masks are written as NIfTI; name a .nii.gz or .nii file, or '
                        'a folder')
    if not to_folder and not volumes.nibabel_opens(target.name):
      raise ConfigError(f'--output={target}: write its suffix in one case, .nii.gz or .nii (nibabel would '
                        'write another name)')
    return [(scan, target / name if to_folder else target)]

  if source.is_file():
    if not volumes.volume_stem(source.name) and dicom.is_dicom_file(source):
      raise DataError(f'{source}: a DICOM file; give its folder, --input={source.parent} (with --series to '
                      'pick one of the series there)')
    return single(source, _mask_name(source)), False
  if target.resolve() == source.resolve():  # a rerun would take the masks for scans
    raise ConfigError(f'--output={target}: the input folder; the masks go into a folder of their own')
  entries = sorted(source.iterdir())
  # Named as volumes, also what is not a readable file (a broken link, a folder): their checks fail them.
  files = [p for _, p in volumes.volume_files(source)]
  if channels := _other_channels(files):
    logging.warning("%s: %d file(s) read as other channels of nnU-Net's <id>_0000 scans, which this "
                    'one-channel model does not use, left out (rename scans to segment them): %s', source,
                    len(channels), ', '.join(p.name for p in channels[:5]) + ', ...' * (len(channels) > 5))
    files = [p for p in files if p not in channels]
  # Not the volumes' own data files (an .mhd's .raw voxels may start like a DICOM data set without preamble).
  volume_parts = {*files, *map(volumes.data_file, files)}
  dicom_files = [p for p in entries if p.is_file() and p not in volume_parts and dicom.is_dicom_file(p)]
  if not files and (series or dicom_files):
    folder = source.resolve()  # named as itself in what is printed and written, also where given as '.'
    return single(folder, f'{folder.name}.nii.gz'), False
  if dicom_files:
    logging.warning('%s: %d DICOM file(s) beside its volume files not read (a series segments as a folder '
                    'of its own)', source, len(dicom_files))
  if broken := [f'{p.name}: {why}' for p in entries if p not in files and (why := volumes.broken_link(p))]:
    logging.warning('%s: %d link(s) to what is gone left out (a series folder moved or unmounted?): %s',
                    source, len(broken), ', '.join(broken[:5]))
  folders = [p for p in entries if p.is_dir() and dicom.is_dicom_folder(p)]
  if not files and not folders:
    layout = next(((images, labels) for images, labels in (('images', 'labels'), ('imagesTr', 'labelsTr'))
                   if (source / images).is_dir()), None)
    hint = (f'; a data set: --input={source / layout[0]} (and --labels={source / layout[1]} to score the '
            'masks)' if layout else '')
    suffixes = ', '.join(f'*{suffix}' for suffix in volumes.VOLUME_SUFFIXES)
    raise DataError(f'{source}: no NIfTI, MetaImage or NRRD file ({suffixes}) and no DICOM series in this '
                    f'directory{hint}')
  pairs = [(p, target / _mask_name(p)) for p in files] + [(p, target / f'{p.name}.nii.gz') for p in folders]
  if target.name.lower().endswith(volumes.NIFTI_SUFFIXES) and not target.is_dir():
    if len(pairs) > 1:
      raise ConfigError(f'--output={target}: a mask file, and --input={source} holds {len(pairs)} scans, '
                        'whose masks go into a folder; name a folder'
                        + ('' if files else ', or pick one DICOM series of them with --series'))
    return [(pairs[0][0], target)], False
  return pairs, True


def _other_channels(files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
  """The files of a folder in nnU-Net's layout that are not a scan's first channel: where every file is
  <id>_NNNN and two ids or more have the same channels 0000, 0001, ... (scans numbered scan_0000,
  scan_0001, or visits 9001104_0000, 9001104_0012, are not), their <id>_0001, ...; else none."""
  stems = {path: volumes.volume_stem(path.name) for path in files}
  channels = collections.defaultdict(set)
  for stem in stems.values():
    if not re.fullmatch(r'.+_\d{4}', stem):
      return []
    channels[stem[:-5]].add(int(stem[-4:]))
  if len(channels) < 2 or len({frozenset(c) for c in channels.values()}) != 1:
    return []
  numbers = next(iter(channels.values()))
  if len(numbers) < 2 or numbers != set(range(len(numbers))):
    return []
  return [path for path, stem in stems.items() if not stem.endswith('_0000')]


def _check_files(source: pathlib.Path, label: pathlib.Path | None, series: str | None) -> None:
  """The checks of a scan's files (and its label map's) that fail a bad one before the model loads."""
  if source.is_dir() and volumes.volume_stem(source.name) and not dicom.is_dicom_folder(source):
    raise DataError(f'{source}: a folder named as a volume file')
  if source.is_dir():
    dicom.find_series(source)
    if label:
      volumes.open_volume(label)
  elif series:
    raise DataError(f'{source}: a volume file, and --series picks a series of DICOM input')
  else:
    volumes.check_headers(volumes.Case(source.name, source, label))


def _read(source: pathlib.Path, series: str | None) -> tuple[nib.Nifti1Image, dict]:
  """The scan as a NIfTI image (a DICOM series converted in memory) and what its DICOM headers say, or for a
  volume file the knee's side from a dcm2niix (BIDS) sidecar beside it, `<scan>.json`: its SeriesDescription
  (`dicom.description_side`; dcm2niix writes no Laterality tag there)."""
  if source.is_dir():
    return dicom.read_series(source, series)
  sidecar = _sidecar(source)
  info = {}
  if sidecar.is_file():
    try:
      raw = sidecar.read_bytes()
      # UTF-8, -16 or -32 as JSON detects it; a byte that is not (a description in the scanner's Latin-1)
      # is replaced, the words naming a side kept.
      description = str(json.loads(raw.decode(json.detect_encoding(raw), errors='replace'))
                        .get('SeriesDescription') or '')
    except (OSError, ValueError, AttributeError):
      logging.warning('%s: not a JSON object with a SeriesDescription; the knee side is not read from it',
                      sidecar)
    else:
      if side := dicom.description_side(description):
        info = {'laterality': side,
                'laterality_from': f"the series description '{description}' of {sidecar.name}"}
  return volumes.open_volume(source), info


def _sidecar(source: pathlib.Path) -> pathlib.Path:
  """Where dcm2niix writes a volume file's JSON sidecar: `<scan>.json` beside it."""
  return source.with_name(volumes.volume_stem(source.name) + '.json')


def _label_files(pairs: Sequence[tuple[pathlib.Path, pathlib.Path]], labels_path: str | pathlib.Path,
                 batch: bool) -> dict[pathlib.Path, pathlib.Path]:
  """{scan: its label map} for --labels: a label file of the one scan, or a directory holding each scan's
  under the scan's name (<name> with one of `volumes.VOLUME_SUFFIXES`), or under <id> for nnU-Net's <id>_0000
  images."""
  labels = pathlib.Path(labels_path)
  volumes.check_not_broken_link(labels)
  if labels.is_file():
    if batch:
      raise DataError(f'--labels={labels}: a file, and --input a directory of scans; give the directory of '
                      'their label maps')
    return {pairs[0][0]: labels}
  if not labels.is_dir():
    raise DataError(f'--labels={labels}: no such label file or directory')
  found = {}
  for source, _ in pairs:
    stem = _stem(source)
    if path := volumes.label_file(labels, stem) or volumes.label_file(labels, stem.removesuffix('_0000')):
      found[source] = path
  if missing := [source.name for source, _ in pairs if source not in found]:
    raise DataError(f'--labels={labels}: no label map for {len(missing)} scan(s) ({", ".join(missing[:5])}); '
                    f"expected each scan's name with {', '.join(volumes.VOLUME_SUFFIXES)}, or "
                    "<id>.nii.gz for nnU-Net's <id>_0000.nii.gz")
  return found


def decide_laterality(nii: nib.Nifti1Image, info: dict, given: str | None, header_sides: bool = True
                      ) -> tuple[str | None, str]:
  """('R', 'L' or None, why): `given` (--laterality), else the side the DICOM series or a volume file's
  sidecar names (`info['laterality']`, read from `info['laterality_from']`: a laterality tag or a series
  description), else, where
  `header_sides` (the header's left-right axis is the knee's) and the header gives a position (its first
  voxel not at the origin, where a file without a pose puts it), the scan's position: a knee centred at least
  10 mm to the patient's right (RAS x > 0) of the scanner's midline is a right knee. None when none of these
  decides; compartments are then named by the patient's side. A named side that the position contradicts
  decides, with a warning."""
  if given:
    return given, 'given by --laterality'
  if not header_sides:
    side, why = None, ("undecided: the header's left-right axis is not the knee's, so the knee's halves are "
                       'named side1 and side2')
  elif not nii.affine[:3, 3].any():
    side, why = None, ('undecided: the header puts the first voxel at the origin, no scanner position (a '
                       "file without a pose, as OAI-ZIB's); pass --laterality to name compartments medial "
                       'and lateral')
  else:
    x = float((nii.affine @ [*((np.array(nii.shape[:3]) - 1) / 2), 1])[0]) * volumes.mm_per_unit(nii)
    side = ('R' if x > 0 else 'L') if abs(x) >= _SIDE_MIN_MM else None
    why = (f"from the position: centred {abs(x):.0f} mm to the patient's {reports.SIDES[side]}" if side else
           f'undecided: the scan is centred {abs(x):.0f} mm from the midline (RAS x); pass --laterality to '
           'name compartments medial and lateral')
  if tag := info.get('laterality'):
    source = info['laterality_from']
    if side and side != tag:
      position = why.removeprefix('from the position: ')
      logging.warning("%s says %s knee, the scan's position %s: the named side is taken; pass --laterality "
                      'if it is wrong', source, reports.SIDES[tag], position)
      return tag, f'from {source}, against its position ({position})'
    return tag, f'from {source}'
  return side, why


def to_classes(probabilities: np.ndarray, background_weight: float) -> np.ndarray:
  """Training classes (uint8) of class probabilities (..., K): the argmax with the background's probability
  multiplied by `background_weight` (1: the plain argmax; above 1 a voxel is cartilage only where the
  network is that much surer of it, which trims the plates' edges)."""
  # One class at a time, the first of equal maxima kept as by np.argmax, whose strided last axis of three
  # and int64 result cost seconds on a scan of 20 M voxels.
  best = probabilities[..., 0] * probabilities.dtype.type(background_weight)
  classes = np.zeros(probabilities.shape[:-1], np.uint8)
  for k in range(1, probabilities.shape[-1]):
    classes[probabilities[..., k] > best] = k
    np.maximum(best, probabilities[..., k], out=best)
  return classes


def remove_small_components(classes: np.ndarray, spacing: Sequence[float], min_mm3: float,
                             min_fraction: float) -> np.ndarray:
  """`classes` with every 3D connected component (face-connected) of a cartilage class smaller than
  `min_mm3` or than `min_fraction` of the class's largest component set to background: the specks and
  ghosts a network leaves on skin, fluid or artefacts, while both tibial plates, whole or fragmented, stay
  (real plates hold thousands of mm^3, the medial and lateral ones of similar size). 0, 0 keeps
  everything."""
  classes = classes.copy()
  for k in volumes.CLASSES.values():
    components, _ = ndimage.label(classes == k)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    small = (sizes * float(np.prod(spacing)) < min_mm3) | (sizes < min_fraction * sizes.max())
    small[0] = False
    classes[small[components]] = 0
  return classes


def _save(path: pathlib.Path, array: np.ndarray, nii: nib.Nifti1Image, slope: float = 1.0) -> None:
  """Writes `array` (canonical order; trailing axes beyond the three spatial ones kept) in the voxel order,
  affine and header (NIfTI-1 or -2; one file, also for a pair's) of `nii`, as its own dtype; readers scale
  the stored values by `slope`. The input's intensity scaling, display range and intent are the scan's, not
  the output's: not kept."""
  back = nib.orientations.ornt_transform(_CANONICAL, nib.io_orientation(nii.affine))
  header = nii.header.copy()
  header.set_data_dtype(array.dtype)
  header.set_intent('none')
  header['cal_min'] = header['cal_max'] = 0
  single_file = nib.Nifti2Image if isinstance(nii, nib.Nifti2Image | nib.Nifti2Pair) else nib.Nifti1Image
  out = single_file(nib.orientations.apply_orientation(array, back), nii.affine, header)
  out.header.set_slope_inter(slope, 0)
  volumes.write_nifti(out, path)


def _file_slices(nii: nib.Nifti1Image, orientation: pose.Orientation, count: int) -> np.ndarray:
  """The scan file's voxel index, along its axis that they cut, of each of the `count` sagittal slices of
  its canonical volume `pose.orient`ed (which leaves that axis's direction as it is)."""
  back = nib.orientations.ornt_transform(_CANONICAL, nib.io_orientation(nii.affine))
  return np.arange(count)[::-1] if back[orientation[0], 1] < 0 else np.arange(count)


def _stem(path: pathlib.Path) -> str:
  return volumes.volume_stem(path.name) or path.name


def _report_paths(target: pathlib.Path, batch: bool) -> dict[str, pathlib.Path]:
  """Where a scan's thickness maps, slice figure and class probabilities go: beside a single mask
  (<mask>_thickness.*, <mask>_slices.png, <mask>_probabilities.nii.gz), in thickness/, slices/ and
  probabilities/ of a batch, whose scans' results also go into measures/<scan>.json ('result')."""
  if batch:
    return {'map': target.parent / 'thickness' / f'{_stem(target)}.nii.gz',
            'png': target.parent / 'thickness' / f'{_stem(target)}.png',
            'slices': target.parent / 'slices' / f'{_stem(target)}.png',
            'probabilities': target.parent / 'probabilities' / f'{_stem(target)}.nii.gz',
            'result': target.parent / 'measures' / f'{_stem(target)}.json'}
  return {'map': target.with_name(f'{_stem(target)}_thickness.nii.gz'),
          'png': target.with_name(f'{_stem(target)}_thickness.png'),
          'slices': target.with_name(f'{_stem(target)}_slices.png'),
          'probabilities': target.with_name(f'{_stem(target)}_probabilities.nii.gz')}


def _source_stamp(source: pathlib.Path) -> list:
  """What identifies a scan's files as they are now: the path, size and modification time of the file (and
  of the data file its header names, and of its JSON sidecar, which may name the knee's side) or of every
  file of a DICOM folder."""
  if source.is_dir():
    files = dicom.files(source)
  else:
    files = dict.fromkeys(p for p in (source, volumes.data_file(source), _sidecar(source)) if p.is_file())
  return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _mask_stamp(mask: pathlib.Path) -> list[int]:
  """Size and modification time of a mask: a record is of the mask it was written with."""
  return [mask.stat().st_size, mask.stat().st_mtime_ns]


def _finished(record_path: pathlib.Path, settings: dict) -> tuple[dict | None, bool]:
  """(the record, measures/<scan>.json, of a batch scan whose mask, maps and figures are all beside it, the
  mask the one it was written with (`_mask_stamp`: not replaced since); whether it was written with
  `settings`). (None, False) where the record or an output is missing, or the mask was replaced."""
  try:
    record = json.loads(record_path.read_text())
    target = record_path.parent.parent / pathlib.PurePath(record['result']['output']).name
  except (OSError, ValueError, KeyError, TypeError):
    return None, False
  paths = _report_paths(target, batch=True)
  outputs = [target, paths['map'], paths['png'], paths['slices']] + (
      [paths['probabilities']] if 'probabilities' in record['result'] else [])
  if not all(path.is_file() for path in outputs) or record.get('mask') != _mask_stamp(target):
    return None, False
  # The output folder may have been given another way (relative, moved): its paths are this run's.
  record['result'].update(_output_paths(target, True, 'probabilities' in record['result']))
  # A record of an older version names no case: its scan's own (its batch's rule unknown).
  record['result'].setdefault('case', reports.case_ids([record['result']['input']])[0])
  # Undefined figures (an empty plate's thickness) are null in the record (`metrics.nan_as_null`): NaN again.
  for table in ('regions', 'scores'):
    if table in record['result']:
      record['result'][table] = {name: {k: np.nan if v is None else v for k, v in row.items()}
                                 for name, row in record['result'][table].items()}
  return record, record.get('settings') == settings


def _earlier_result(source: pathlib.Path, target: pathlib.Path, settings: dict) -> dict | None:
  """A batch scan's result from an earlier run (`_finished`), if that run segmented these same `source`
  files (`_source_stamp`) with `settings`, with the paths of this run's `target`; else None."""
  record, same_settings = _finished(_report_paths(target, batch=True)['result'], settings)
  try:
    unchanged = record is not None and record.get('source') == _source_stamp(source)
  except OSError:
    return None
  if not (unchanged and same_settings and record['result']['output'] == str(target)):
    return None
  return record['result']


def _warn_if_of_another_scan(record_path: pathlib.Path, source: pathlib.Path) -> None:
  """Warns where a batch scan's outputs are about to replace those a record says another scan made (a scan
  of the same name in another job's input)."""
  try:
    earlier = pathlib.Path(json.loads(record_path.read_text())['result']['input'])
  except (OSError, ValueError, KeyError, TypeError):
    return
  if earlier.resolve() != source.resolve():
    logging.warning('%s: its mask replaces one of another scan of that name (%s) in %s', source, earlier,
                    record_path.parent.parent)


def _others_in_folder(folder: pathlib.Path, ours: set[str], settings: dict) -> tuple[list[dict], list[str]]:
  """The results of the scans finished in a batch's output `folder` (`_finished`) other than those named
  `ours` (stems): (those made with `settings`, by name; the names of those made otherwise). Another job
  writing into the same folder (a job array) or an earlier batch left them there."""
  same, other = [], []
  for record_path in sorted((folder / 'measures').glob('*.json')):
    if record_path.name.startswith('.') or record_path.stem in ours:  # a temporary file, or this batch's
      continue
    record, same_settings = _finished(record_path, settings)
    if record is not None and same_settings:
      same.append(record['result'])
    elif record is not None:
      other.append(record_path.stem)
  return same, other


@contextlib.contextmanager
def _reports_locked(folder: pathlib.Path) -> Iterator[None]:
  """Holds the batch output `folder`'s lock (measures/.reports.lock) while its reports are read and
  rewritten: each job of an array writing into one folder lists the others' scans, and the last one written
  lists all. Where the file system gives no locks, a warning, and unlocked."""
  with open(folder / 'measures' / '.reports.lock', 'a') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:
      logging.warning('%s: cannot lock its reports (%s); jobs writing into it at the same moment may each '
                      "leave reports that miss the other's scans", folder, e)
    yield  # closing the file releases the lock


def _score_kept(result: dict, label: pathlib.Path, values: np.ndarray, label_map: Sequence[Sequence[int]]
                ) -> dict[str, dict]:
  """`evaluate.label_scores` of a kept scan's written mask (`result['output']`, class k written as
  values[k]) against its `label` map (mapped to classes by `label_map`; on the mask's grid), in the
  orientation it was segmented in, as `_segment_scan` scored it: the 2D Dice averages that orientation's
  sagittal slices."""
  mask = pathlib.Path(result['output'])
  orientation = tuple(result.get('orientation_code', pose.HEADER))  # a result written before the field
  mask_nii = volumes.open_volume(mask)
  written, spacing = volumes.read_canonical(mask_nii, mask)
  classes = volumes.remap_labels(written, [(v, k) for k, v in enumerate(values) if k])
  truth = volumes.labels_on_grid(mask_nii, volumes.Case(label.name, mask, label), label_map)
  return evaluate.label_scores(pose.orient(classes, orientation), pose.orient(truth, orientation),
                               pose.oriented_spacing(spacing, orientation))


def _output_paths(target: pathlib.Path, batch: bool, save_probabilities: bool) -> dict[str, str]:
  """A scan's result's paths of its mask, thickness map, figures and class probabilities."""
  paths = _report_paths(target, batch)
  return {'output': str(target), 'thickness_map': str(paths['map']), 'thickness_png': str(paths['png']),
          'slices_png': str(paths['slices']),
          **({'probabilities': str(paths['probabilities'])} if save_probabilities else {})}


def load_network(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None,
                 model_file: str | pathlib.Path | None = None
                 ) -> tuple[int, inference.Network, tuple[float, float] | None]:
  """(step, network, in-plane pixel (mm) its slices are resampled to; None: kept) of `model_file`, or of
  the checkpoint eval.checkpoint names in `workdir`."""
  mesh = parallel.make_mesh()
  if model_file is not None:
    step, graphdef, state = pretrained.load(config, model_file, mesh)
  else:
    workdir = pathlib.Path(workdir)
    step, graphdef, state = steps.restore_for_inference(config, workdir, mesh)
  pixel = None
  if config.predict.resample:
    pixel = tuple(p / config.predict.zoom for p in pipeline.trained_pixel_mm(config, workdir))
  return step, inference.Network(config, graphdef, state, mesh), pixel


def predict(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None,
            input_path: str | pathlib.Path, output_path: str | pathlib.Path,
            model_file: str | pathlib.Path | None = None, *, series: str | None = None,
            laterality: str | None = None, continue_prediction: bool = False,
            labels: str | pathlib.Path | None = None, save_probabilities: bool = False) -> list[dict]:
  """Segments one scan or a directory of them (`_inputs`: volume files, DICOM folders) into `output_path` (a
  mask file, or a directory) with the checkpoint eval.checkpoint names in `workdir`, or with `model_file`
  (`pretrained`: then config is the file's, `pretrained.config_of`). `series` picks a DICOM series by its
  SeriesInstanceUID (`dicom.read_series`; '<uid>:<echo>' for one echo of several), `laterality` ('R' or
  'L') overrides `decide_laterality`. With `labels` (a label file of the one scan, or a directory of the
  scans' label maps, `_label_files`), each mask is scored against its scan's expert labels
  (`evaluate.label_scores`; labels mapped by data.label_map), a kept scan's from its file
  (`_score_kept`). With `save_probabilities`, each scan's class probabilities go beside its mask
  (`_report_paths`) as a 4D NIfTI in the scan's grid, classes (background, FC, TC) on the fourth axis:
  those the mask's argmax was taken of (after the slice smoothing, before the background weight and the
  small components' removal), stored as uint8 with the scale factor 1/255.

  A batch goes on past a scan that fails with a `DataError` (logged; the checks of its files before the model
  loads included, which refuse a batch at once only if every scan fails them; a label map they refuse,
  or one holding values data.label_map does not know, leaves its scan unscored) and raises one naming the
  failed and unscored scans at its end; its reports are rewritten after every scan, so a batch stopped part
  way keeps the measures of the scans done, and list the output folder's other scans made with the same
  model and settings (`_others_in_folder`: another job of an array, an earlier batch) after its own. With
  `continue_prediction`, a batch keeps each scan that an earlier run with the same model and settings
  finished (`_earlier_result`) and segments the rest.

  Beside the masks: each scan's thickness map (NIfTI in the scan's grid, and a PNG), its prediction on three
  sagittal slices (`figures.plot_prediction_slices`), and the measures of every scan per plate and
  compartment as CSV and Markdown (`reports.write_reports`: <mask>_measures.csv and <mask>_report.md for
  one scan; measures.csv and report.md of a batch, and each batch scan's result as measures/<scan>.json; the
  scores against labels as <mask>_scores.csv or scores.csv, and in the report). Returns per scan {'case'
  (`reports.case_ids` of the scans given), 'input' (a batch's, and its 'labels', as absolute paths),
  'output', 'laterality', 'laterality_text', 'regions': `measures.compartment_table`, paths of the maps and
  figures, 'orientation', 'orientation_code' and 'rotation_deg' (how the scan was turned to be segmented),
  the seconds spent outside compilation ('seconds'), in it ('compile_s') and in the network's forward
  passes ('forward_s'), and with labels 'labels' and 'scores'}.
  """
  if model_file is not None:  # a config of one's own beside it: the file's pixel size where it sets none
    # (a config that names it, as main.py's does, leaves the file unread)
    config = pretrained.config_of(model_file, config.copy_and_resolve_references())
  elif workdir is None:
    raise ConfigError('predict: expected a model file (model_file=, e.g. pretrained.SHIPPED) or the workdir '
                      'of a training (workdir=)')
  if laterality not in (None, 'R', 'L'):
    raise ConfigError(f"laterality: expected 'R', 'L' or None, got {laterality!r}")
  if config.predict.label_values not in LABEL_VALUES:
    raise ConfigError(f'predict.label_values: expected one of {sorted(LABEL_VALUES)}, '
                      f'got {config.predict.label_values!r}')
  values = np.array(LABEL_VALUES[config.predict.label_values], np.uint8)
  pairs, batch = _inputs(input_path, output_path, series)
  if batch and pathlib.Path(output_path).is_file():
    raise ConfigError(f'{output_path}: a file; the masks of a directory of scans go into a directory')
  stems = collections.Counter(_stem(target) for _, target in pairs)
  if twice := sorted(stem for stem, n in stems.items() if n > 1):
    raise DataError(f'{input_path}: scans {", ".join(twice)} each come twice (as two files of '
                    f'{", ".join(volumes.VOLUME_SUFFIXES)}, or a file and a DICOM folder), whose masks, '
                    'thickness maps and figures would overwrite each other; keep one')
  label_files = _label_files(pairs, labels, batch) if labels else {}
  if labels:  # what an nnU-Net data set's dataset.json, beside its labelsTr/, says its labels are
    folder = pathlib.Path(labels).resolve()  # also when given as '.' or a file name in labelsTr/
    volumes.check_dataset_json((folder if folder.is_dir() else folder.parent).parent, config.data.label_map)
  inputs = {path.resolve() for path in [source for source, _ in pairs] + list(label_files.values())}
  refused, unscored = {}, {}  # {scan of a batch: why its files, or its label map's, fail the checks}
  folders = set()
  for source, target in pairs:  # checks first: a bad file fails before the checkpoint is restored
    paths = _report_paths(target, batch)
    outputs = [target, paths['map'], paths['slices'], *([paths['result']] if batch else []),
               *([paths['probabilities']] if save_probabilities else [])]
    if not save_probabilities and paths['probabilities'].resolve() in inputs:  # an earlier run's are removed
      raise ConfigError(f"{paths['probabilities']}: predict removes a mask's earlier probabilities, and this "
                        'is an input scan or label map; choose another --output')
    if too_long := [w.name for w in outputs if len(os.fsencode(w.name)) > atomic.NAME_MAX]:
      error = (f'{source}: its output {too_long[0]} would be named in {len(os.fsencode(too_long[0]))} bytes, '
               f'over the {atomic.NAME_MAX} a file system allows; give the scan a shorter name')
      if not batch:
        raise DataError(error)
      refused[source] = error
      continue
    for written in outputs:
      if written.resolve() in inputs:
        raise ConfigError(f'{written}: the output would overwrite an input scan or label map; choose '
                          'another --output')
      # A folder that cannot be made or written to fails now, not after the segmentation; it is made once
      # the model has loaded, so that a refused model leaves no empty folders behind.
      if why := config_check.file_in_the_way(written.parent):
        raise DataError(f'{written.parent}: cannot make the output folder: {why}')
      nearest = next(p for p in (written.parent, *written.parent.parents) if p.exists())
      if not os.access(nearest, os.W_OK):
        raise DataError(f'{written.parent}: the output folder is not writable' if nearest == written.parent
                        else f'{written.parent}: cannot make the output folder: {nearest} is not writable')
      folders.add(written.parent)
    try:
      _check_files(source, label_files.get(source), series)
    except DataError as e:
      if not batch:
        raise
      error, label_only = one_line(e), source in label_files
      if label_only:  # the scan's own files read again, alone: is its label map the bad file?
        try:
          _check_files(source, None, series)
        except DataError:
          label_only = False
      if label_only:  # segmented (or kept) unscored, and named at the end
        unscored[source] = _not_scored(e, source)
        del label_files[source]
      else:  # the batch goes on without it, and ends in an error
        refused[source] = error
  if refused and len(refused) == len(pairs):
    raise DataError(f'all {len(pairs)} scans fail their checks, e.g. {next(iter(refused.values()))}')
  for error in [*refused.values(), *unscored.values()]:
    logging.error('%s', error)
  step, network, pixel = load_network(config, workdir, model_file)
  for folder in folders:
    try:
      folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise DataError(f'{folder}: cannot make the output folder ({e.strerror})') from None
    atomic.remove_left_by_dead(folder)  # the half-written files of a killed run
  logging.info('predict: step %d of %s, %d scan(s), pixel %s mm', step, model_file or workdir, len(pairs),
               'as given' if pixel is None else ' x '.join(f'{p:g}' for p in pixel))
  files = (('measures', 'measures.csv'), ('report', 'report.md'), ('scores', 'scores.csv'),
           ('bland_altman', 'bland_altman_thickness.png'))
  if batch:
    report_files = {name: pathlib.Path(output_path) / file for name, file in files}
  else:
    stem = pairs[0][1].with_name(_stem(pairs[0][1]))
    report_files = {name: stem.with_name(f'{stem.name}_{file}') for name, file in files}
  # What made a batch's masks: --continue_prediction keeps a scan's earlier result only if they match. The
  # model by its weights, not its path: a model file or a workdir may be overwritten by another training.
  settings = json.loads(json.dumps({
      'model_sha256': network.weights_sha256(), 'dtype': config.model.dtype,  # bfloat16 moves edges
      'predict': config.predict.to_dict(), 'series': series,
      'laterality': laterality, 'save_probabilities': save_probabilities, 'version': RESULT_VERSION}))
  made_by = f"step {step} of `{model_file or workdir}` (weights SHA-256 {settings['model_sha256'][:12]})"
  # Each scan's case id by the scans given with it, whatever other runs left in the output folder.
  cases = dict(zip((source for source, _ in pairs), reports.case_ids([source for source, _ in pairs])))
  kept = {}
  if continue_prediction and batch:
    # Without their scores, which are of the labels given then: a kept scan is scored again if labels are.
    kept = {target: {**{k: v for k, v in result.items() if k not in ('labels', 'scores')},
                     'case': cases[source]}
            for source, target in pairs
            if source not in refused and (result := _earlier_result(source, target, settings)) is not None}
    logging.info('predict: %d of %d scan(s) kept from an earlier run with the same model and settings',
                 len(kept), len(pairs))
  elif continue_prediction:
    logging.warning('--continue_prediction keeps the scans of a folder that an earlier run finished; %s is '
                    'one scan, segmented again', input_path)
  done, failed, progress = {}, set(refused), Progress(len(pairs), done=len(kept))
  ours = {_stem(target) for _, target in pairs}
  if batch and (otherwise := _others_in_folder(pathlib.Path(output_path), ours, settings)[1]):
    logging.warning('%s: %d scan(s) in it were segmented with another model or other settings and are left '
                    'out of its reports: %s', output_path, len(otherwise), ', '.join(otherwise))

  def write_reports() -> list[dict]:
    """Rewrites the reports: in input order the scans done and those kept that the loop is yet to reach,
    then a batch folder's other scans made alike (`_others_in_folder`); returns the results reported."""
    reported = [r for _, target in pairs if (r := done.get(target) or kept.get(target))]
    if not batch:
      reports.write_reports(reported, report_files, made_by)
      return reported
    with _reports_locked(pathlib.Path(output_path)):
      reported += _others_in_folder(pathlib.Path(output_path), ours, settings)[0]
      reports.write_reports(reported, report_files, made_by)
    return reported

  if kept:  # the earlier run's reports also hold the scans to segment again: until each is done, they don't
    write_reports()

  for source, target in pairs:
    if source in refused:
      progress.update()
      continue
    case_start, forward_before, compile_before = time.perf_counter(), network.forward_s, network.compile_s
    try:
      label = label_files.get(source)
      if target in kept:  # scored from its mask
        result = dict(kept[target])
        if label:
          try:
            result.update(labels=str(label), scores=_score_kept(result, label, values, config.data.label_map))
          except DataError as e:  # values the label map should not hold: kept unscored
            result['unscored'] = _not_scored(e, source)
      else:
        if batch:  # not done any more: a stop while it is rewritten must not keep the old result
          _warn_if_of_another_scan(_report_paths(target, batch)['result'], source)
          _report_paths(target, batch)['result'].unlink(missing_ok=True)
        result = _segment_scan(config, network, pixel, source, target, batch, series, laterality, values,
                               label, save_probabilities)
        result['compile_s'] = network.compile_s - compile_before
        result['seconds'] = time.perf_counter() - case_start - result['compile_s']
        result['forward_s'] = network.forward_s - forward_before
      if why := result.pop('unscored', None):
        unscored[source] = why
        logging.error('%s', why)
      elif label:
        reports.print_scores(source, result)
    except DataError as e:
      if not batch:
        raise
      failed.add(source)  # the others go on; the batch ends in an error naming this one
      logging.error('%s', one_line(e))
      if target not in kept:
        progress.update()
      continue
    result['case'] = cases[source]
    if batch:  # its scan and label map by absolute paths: the reports also list other runs' scans
      result['input'] = str(source.absolute())
      if 'labels' in result:
        result['labels'] = str(pathlib.Path(result['labels']).absolute())
    done[target] = result
    if batch:  # written last: a scan is done when its result is (what --continue_prediction reads); a kept
      # scan's again, with this run's paths and scores, as the reports have them
      record = _report_paths(target, batch)['result']
      atomic.write_text(record, json.dumps(metrics.nan_as_null({
          'model': str(model_file or workdir), 'step': step, 'settings': settings,
          'source': _source_stamp(source), 'mask': _mask_stamp(target), 'result': result}), default=float))
      if target not in kept:  # the reports so far: a batch stopped part way keeps its done and kept scans
        write_reports()
    if target in kept:
      continue
    progress.update()
    # The scan's time leaves out the network's compilation (the first scan of a slice size), said apart
    # where it took a tenth of a second as printed.
    compiling = f', plus {result["compile_s"]:.1f} s compiling' if result['compile_s'] >= 0.05 else ''
    logging.info('%s: %s in %.1f s (forward passes %.1f s)%s', progress.status('predict'), source.name,
                 result['seconds'], result['forward_s'], compiling)
  results = list(done.values())
  if results:
    reported = write_reports()  # a single scan's; a batch's also when every scan was kept
    written = [report_files['measures'], report_files['report']]
    if any('scores' in r for r in reported):
      written += [report_files['scores'], report_files['bland_altman']]
    if scored := [r['scores'] for r in results if 'scores' in r]:
      fc, tc = ([s[plate]['dice'] for s in scored] for plate in ('fc', 'tc'))
      print(f'3D Dice against the labels, {len(scored)} scan(s): FC {reports.mean_std(fc)} %, '
            f'TC {reports.mean_std(tc)} %, mean of FC and TC {np.mean([fc, tc]):.2f} %', flush=True)
    others = len(reported) - len(results)
    more = f' and of {others} more already in {output_path} (the same model and settings)' if others else ''
    print(f'measures of {len(results)} scan(s){more}: {", ".join(map(str, written))}', flush=True)
  if failed or unscored:
    def names(chosen) -> str:
      return ', '.join(source.name for source, _ in pairs if source in chosen)

    problems = ([f'{len(failed)} of {len(pairs)} scans failed (their errors above): {names(failed)}']
                if failed else [])
    problems += ([f'{len(unscored)} of {len(pairs)} scans not scored (their label maps refused above): '
                  f'{names(unscored)}'] if unscored else [])
    raise DataError(f'{"; ".join(problems)}; the others are written to {output_path}')
  return results


def _not_scored(error: DataError, source: pathlib.Path) -> str:
  """Why a batch scan goes unscored: its label map's error, on one line."""
  return f'{one_line(error)}: {source.name} is not scored'


def _segment_scan(config: ml_collections.ConfigDict, network: inference.Network,
                  pixel: tuple[float, float] | None, source: pathlib.Path, target: pathlib.Path,
                  batch: bool, series: str | None, laterality: str | None, values: np.ndarray,
                  label: pathlib.Path | None, save_probabilities: bool) -> dict:
  """Segments one scan into `target` and writes its thickness map and figures (`_report_paths`; and its
  class probabilities if `save_probabilities`), scored against its `label` map if given; returns its
  result (`predict`'s, less the timings). A batch scan whose label map holds values that data.label_map does
  not know, or lies on another grid, is segmented unscored: its result says why under 'unscored'."""
  nii, info = _read(source, series)
  truth, unscored = None, None
  if label is not None:
    try:
      truth = volumes.labels_on_grid(nii, volumes.Case(source.name, source, label), config.data.label_map)
    except DataError as e:
      if not batch:
        raise
      label, unscored = None, _not_scored(e, source)
  if source.is_dir():
    found = '; '.join(f"{s['name']} '{s['description']}' ({s['slices']} slices)"
                      for s in info['series_found'])
    print(f"{source}: {len(info['series_found'])} DICOM series: {found}; used {info['series_used']}",
          flush=True)
  image, spacing = volumes.canonical_image(nii, source)  # axis 0 is left-right
  if np.array_equal(nii.affine[:3, :3], np.eye(3)):
    logging.warning("%s: the header's voxel-to-world affine is the identity (1 mm voxels, axes as stored), "
                    'as a conversion that lost the geometry writes it: the model resamples by the voxel '
                    'size, so unless the voxels are 1 mm the mask will be wrong; give the scan its voxel '
                    'size', source)
  elif not (nii.header.get('qform_code') or nii.header.get('sform_code') or source.is_dir()):
    logging.warning("%s: the header gives no orientation (qform and sform codes 0), so nibabel's default "
                    "is taken: the patient's left along the first axis; medial and lateral follow it only "
                    'if that is right', source)
  if (levels := volumes.few_grey_levels(image)) is not None:
    logging.warning('%s: the image holds only %d distinct values (%s): a label map or mask given as the '
                    'scan? Expect a meaningless mask', source, len(levels),
                    ', '.join(f'{v:g}' for v in levels))
  if pixel is not None and not inference.slices_fit(image.shape[1:], spacing[1:], pixel):
    size = inference.resampled_size(image.shape[1:], spacing[1:], pixel)
    raise DataError(f"{source}: voxel size {' x '.join(f'{s:g}' for s in spacing)} mm makes a sagittal "
                    f"slice {size[0]} x {size[1]} pixels of the model's {pixel[0]:.3g} mm; check the "
                    "header's voxel size and its unit (mm)")
  orientation, degrees = pose.HEADER, 0.0
  if config.predict.orientation_check:  # a minute on a CPU for a large scan: said before it starts
    logging.info('%s: checking how the knee lies against its header', source.name)
    orientation, ratio, upright_share = pose.sagittal_orientation(network, image, spacing, pixel)
    if any(orientation):
      logging.warning("%s: the knee lies turned against its header (%s: the network is %s that way) and "
                      "is segmented so; the mask is in the scan's voxel grid as always. Check the header "
                      '(its sides may be wrong too), or keep its orientation with '
                      'predict.orientation_check=False',
                      source, pose.describe_orientation(orientation), pose.surer(ratio))
      image, spacing = pose.orient(image, orientation), pose.oriented_spacing(spacing, orientation)
      truth = None if truth is None else pose.orient(truth, orientation)
    degrees, ratio = pose.sagittal_rotation(network, image, spacing, pixel, upright_share)
    if degrees:
      logging.warning('%s: the knee lies rotated in the sagittal plane beyond the poses the model learnt '
                      '(the network is %s with the slices rotated by %+g degrees): segmented so rotated, '
                      'the probabilities rotated back', source, pose.surer(ratio), degrees)
  if pixel is not None and max(spacing[1:]) > _COARSE_PIXEL_RATIO * max(pixel):
    logging.warning('%s: sagittal slices of %s mm pixels, over %g times coarser than the %.3g mm pixels '
                    'the network reads them at: acquired in another plane? The model segments sagittal '
                    'slices; expect coarse masks',
                    source, ' x '.join(f'{s:g}' for s in spacing[1:]), _COARSE_PIXEL_RATIO, pixel[0])
  rotated = pose.rotate_slices(image, degrees, spacing) if degrees else image
  probabilities = inference.class_probabilities(network, rotated, spacing, pixel, config.predict.subpixel_tta,
                                                config.predict.slice_sigma_mm, source.name)
  if degrees:
    probabilities = pose.rotate_slices(probabilities, -degrees, spacing)
  marked = to_classes(probabilities, config.predict.background_weight)
  classes = remove_small_components(marked, spacing, config.predict.min_component_mm3,
                                    config.predict.min_component_fraction)
  side, why = decide_laterality(nii, info, laterality, header_sides=not orientation[0])
  if side and orientation[0]:
    why += ("; its halves named side1 and side2: the check took another of the header's axes for left-right, "
            'in an unknown direction, so which is medial is not known')
  sides = measures.side_names(side, sides_known=not orientation[0])
  fc, tc = (classes == volumes.CLASSES[name] for name in ('fc', 'tc'))
  if missing := [name for name, plate in (('femoral', fc), ('tibial', tc)) if not plate.any()]:
    fov_mm = [n * s for n, s in zip(image.shape[1:], spacing[1:])]
    causes = (f'a field of view too small (sagittal slices of {fov_mm[0]:.0f} x {fov_mm[1]:.0f} mm, where a '
              "knee MRI's span 120-160 mm), " if min(fov_mm) < _SMALL_FOV_MM else '')
    # A slab of a few slices holds only pieces of the plates, each under the speck floor: the causes below
    # alone would mislead.
    marked_mm3 = {name: np.count_nonzero(marked == volumes.CLASSES[key]) * float(np.prod(spacing))
                  for name, key in (('femoral', 'fc'), ('tibial', 'tc')) if name in missing}
    if pieces := [f'{name} pieces of {mm3:.0f} mm^3' for name, mm3 in marked_mm3.items() if mm3]:
      # Only the floor drops a whole plate: the fraction's test always keeps a class's largest piece.
      width_mm = image.shape[0] * spacing[0]
      causes += (f"{' and '.join(pieces)} in all dropped as specks (predict.min_component_mm3 "
                 f'{config.predict.min_component_mm3:g}; 0 keeps them)'
                 + (f' in a scan that spans {width_mm:.1f} mm from left to right (a slab of a few slices?)'
                    if width_mm < _SLAB_MM else '') + ', ')
    logging.warning('%s: no %s cartilage found: %sa scan of another joint, or a header whose voxel sizes or '
                    'axes do not follow its voxels (an array saved in another axis order than its affine '
                    'says)? The mask is written as found', source, ' or '.join(missing), causes)
  if (width := measures.left_right_width_mm(fc | tc, spacing)) > measures.ONE_KNEE_MAX_WIDTH_MM:
    logging.warning("%s: cartilage spans %.0f mm from left to right, more than one knee's (under %g mm): "
                    "both knees in the field of view? The plates' measures add both knees, compartments are "
                    "not measured, and its side is the field of view's; segment each knee's half of the scan "
                    'on its own', source, width, measures.ONE_KNEE_MAX_WIDTH_MM)
    regions = {}
  elif not (regions := measures.compartment_regions(fc, tc, spacing, sides)) and (fc.any() or tc.any()):
    logging.warning('%s: no gap between medial and lateral plates in the tibial or femoral cartilage (a '
                    'field of view that holds half the knee, or a plate denuded or missed?): its '
                    'compartments are not measured, only its plates', source)
  table, thickness = measures.compartment_table(fc, tc, spacing, regions)
  paths = _report_paths(target, batch)
  _save(target, pose.unorient(values[classes], orientation), nii)
  _save(paths['map'], pose.unorient(thickness, orientation), nii)
  if save_probabilities:
    _save(paths['probabilities'],
          pose.unorient(np.round(probabilities * 255).astype(np.uint8), orientation), nii, slope=1 / 255)
  else:  # an earlier run's would sit beside a mask they were not taken of
    paths['probabilities'].unlink(missing_ok=True)
  knee = f'{reports.SIDES[side]} knee' if side else 'knee of unknown side'
  # A name in another encoding than the file system's (a Latin-1 folder name) holds surrogates, which
  # matplotlib cannot draw: shown with a replacement character instead.
  title = f'{os.fsencode(_stem(target)).decode(errors="replace")}: {knee}'
  figures.plot_thickness_maps(thickness, {'fc': fc, 'tc': tc}, spacing, sides, title, paths['png'])
  figures.plot_prediction_slices(image, classes, spacing, title, paths['slices'], truth,
                                 _file_slices(nii, orientation, len(image)))
  result = {'input': str(source), 'laterality': side, 'laterality_text': f'{knee} ({why})', 'regions': table,
            **_output_paths(target, batch, save_probabilities),
            'orientation': (pose.describe_orientation(orientation) if any(orientation)
                            else reports.AS_THE_HEADER),
            'orientation_code': orientation, 'rotation_deg': degrees}
  if truth is not None:
    result.update(labels=str(label), scores=evaluate.label_scores(classes, truth, spacing))
  if unscored:
    result['unscored'] = unscored
  fc_text, tc_text = (f"{table[plate]['volume_mm3']:.0f} mm^3, mean thickness "
                      f"{reports.number(table[plate]['thickness_mean_mm'], '.2f', ' mm')}"
                      for plate in ('fc', 'tc'))
  print(f"{source.name}: {result['laterality_text']}; FC {fc_text}; TC {tc_text} -> {target}", flush=True)
  return result
