"""DICOM input: one MRI series from a folder of DICOM files, as a NIfTI image with the RAS affine its headers
give, so that a scanner export can be predicted on without a separate conversion step. A series may come as
one file per slice (classic MR images) or as multi-frame files (enhanced MR images, as Siemens XA and
Philips export): each frame is read as a slice with the geometry of its functional groups.

The voxel order is SimpleITK's (and that of dcm2niix-like tools): array index (i, j, k) is (column, row,
slice), slices ascending along the normal cross(row cosine, column cosine). tests/test_dicom.py checks shape,
affine and voxels against SimpleITK.
"""

import collections
import pathlib
import re
import struct
import zlib
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pydicom
from absl import logging
from pydicom.errors import InvalidDicomError

from easunet_jax.data import volumes
from easunet_jax.errors import DataError, one_line

_GEOMETRY_TAGS = {'ImagePositionPatient': 3, 'ImageOrientationPatient': 6, 'PixelSpacing': 2}
_SAME_TOL = 1e-4  # cosines and pixel spacings (mm) of one series differ by header rounding only
_DUPLICATE_TOL_MM = 1e-3
_SPACING_TOL, _SPACING_TOL_MM = 0.01, 0.01  # a step may differ from the median by the larger of the two
# Slices whose normals are more than 10 degrees apart lie in other planes: localizers under the series' UID.
_PLANE_COS = float(np.cos(np.radians(10)))
# What a truncated, corrupt or foreign file raises inside pydicom, on reading or on converting a value.
_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, KeyError, struct.error, zlib.error,
                InvalidDicomError, RecursionError)  # the last: sequences nested without end

# Functional-group macros of an enhanced (multi-frame) image and the classic tags each gives a frame; a
# per-frame macro overrides the shared one.
_FRAME_MACROS = {
  'PlanePositionSequence': ('ImagePositionPatient',),
  'PlaneOrientationSequence': ('ImageOrientationPatient',),
  'PixelMeasuresSequence': ('PixelSpacing',),
  'PixelValueTransformationSequence': ('RescaleSlope', 'RescaleIntercept'),
  'FrameContentSequence': ('InStackPositionNumber',),
  'MREchoSequence': ('EffectiveEchoTime',),
  'MRImageFrameTypeSequence': ('ComplexImageComponent',),
  'FrameAnatomySequence': ('FrameLaterality',),
}
_FILE_TAGS = ('SeriesInstanceUID', 'SOPInstanceUID', 'SeriesDescription', 'SeriesNumber', 'Manufacturer',
              'Laterality', 'Rows', 'Columns', 'PatientID', 'ImageType')
_DESCRIPTION_SIDES = {'RIGHT': 'R', 'RT': 'R', 'LEFT': 'L', 'LT': 'L'}
# ImageType values (its third and later) of a classic image that is not a magnitude image: Siemens' and
# Philips' phase, real and imaginary images, which may share a series with the magnitude ones.
_NOT_MAGNITUDE = {'P', 'PHASE', 'PHASE MAP', 'R', 'REAL', 'I', 'IMAGINARY'}
# The first two bytes of a DICOM data set stored without preamble: group 0002 or 0008, little-endian.
_BARE_GROUPS = (b'\x02\x00', b'\x08\x00')
_VRS = {vr.value.encode() for vr in pydicom.valuerep.VR if len(vr.value) == 2}


class Slice(NamedTuple):
  """One 2D image of a series: a single-frame file, or one frame (0-based) of a multi-frame file."""
  path: pathlib.Path
  frame: int | None = None

  def __str__(self) -> str:
    return self.path.name if self.frame is None else f'{self.path.name} frame {self.frame + 1}'


Members = list[tuple[Slice, pydicom.Dataset]]


class Series(NamedTuple):
  uid: str  # SeriesInstanceUID
  description: str  # SeriesDescription or ''
  number: int | None  # SeriesNumber
  slices: tuple[Slice, ...]  # sorted by position along the normal (by InstanceNumber without geometry)
  echo: int | None = None  # the echo, where the series holds several (each one its own volume)

  @property
  def name(self) -> str:
    """What --series takes: the SeriesInstanceUID, with ':<echo>' for one echo of a multi-echo series."""
    return self.uid if self.echo is None else f'{self.uid}:{self.echo}'


def is_dicom_file(path: pathlib.Path) -> bool:
  """Whether the file is DICOM, checked without parsing it: the file format's 128-byte preamble and 'DICM'
  marker, or a data set stored without them, as some PACS and older ACR-NEMA exports are (dcm2niix and GDCM
  read these too): one that starts at a little-endian element of the identifying group 0008, or of the file
  meta (group 0002)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
  except OSError:
    return False
  if head[128:] == b'DICM':
    return True
  element = int.from_bytes(head[2:4], 'little')
  if len(head) < 12 or head[:2] not in _BARE_GROUPS or element >= 0x100:
    return False
  if head[4:6] in _VRS:  # explicit VR, as the file meta always is
    return True
  if head[:2] != b'\x08\x00':
    return False
  # Implicit VR: a short length; an empty value followed by the group's next element; or a sequence of
  # undefined length, followed by its first item or its end.
  length = int.from_bytes(head[4:8], 'little')
  return (0 < length < 1024
          or (length == 0 and head[8:10] == b'\x08\x00' and int.from_bytes(head[10:12], 'little') > element)
          or (length == 0xFFFFFFFF and head[8:12] in (b'\xfe\xff\x00\xe0', b'\xfe\xff\xdd\xe0')))


def _read(path: pathlib.Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
  """A DICOM file's data set (`is_dicom_file`). One without file meta gets the transfer syntax its encoding
  shows, which pydicom needs to decode its pixels."""
  ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
  if 'TransferSyntaxUID' not in ds.file_meta:  # little-endian: `is_dicom_file` takes no other bare data set
    implicit_vr, _ = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit_vr else
                                      pydicom.uid.ExplicitVRLittleEndian)
  return ds


def files(folder: pathlib.Path) -> list[pathlib.Path]:
  """The files under `folder`, at any depth, sorted."""
  return [p for p in sorted(folder.rglob('*')) if p.is_file()]


def is_dicom_folder(path: str | pathlib.Path) -> bool:
  """A directory holding at least one DICOM file (`is_dicom_file`), searched recursively."""
  path = pathlib.Path(path)
  return path.is_dir() and any(is_dicom_file(p) for p in files(path))


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
  """The tag's `count` finite numbers; None when it is absent, empty, of another length or unreadable."""
  try:
    values = np.array([float(v) for v in ds.get(keyword)], np.float64)
  except (TypeError, ValueError):
    return None
  return values if values.shape == (count,) and np.isfinite(values).all() else None


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
  """The tag as an integer; None when it is absent, empty or unreadable."""
  try:
    return int(ds.get(keyword))
  except (TypeError, ValueError):
    return None


def _frames(path: pathlib.Path, ds: pydicom.Dataset) -> Members:
  """The slices of one file with a classic header each: the file's own for a single-frame file; for a
  multi-frame (enhanced) file, per frame the file's series tags and the tags of its functional groups
  (its echo by EffectiveEchoTime: `_scan` numbers the echoes)."""
  frames = _int(ds, 'NumberOfFrames') or 1
  if 'PerFrameFunctionalGroupsSequence' not in ds:
    if frames > 1:
      raise DataError(f'{path}: multi-frame file without per-frame functional groups, so its {frames} '
                      'frames cannot be placed in space (export the series as one file per slice)')
    return [(Slice(path), ds)]
  per_frame = ds.PerFrameFunctionalGroupsSequence
  if len(per_frame) != frames:
    raise DataError(f'{path}: {frames} frames but {len(per_frame)} per-frame functional groups')
  shared = ds.get('SharedFunctionalGroupsSequence') or [pydicom.Dataset()]
  headers = []
  for groups in per_frame:
    header = pydicom.Dataset()
    for keyword in _FILE_TAGS:
      if keyword in ds:
        header[keyword] = ds[keyword]
    for macro, keywords in _FRAME_MACROS.items():
      items = groups.get(macro) or shared[0].get(macro) or [pydicom.Dataset()]
      for keyword in keywords:
        if keyword in items[0]:
          header[keyword] = items[0][keyword]
    headers.append(header)
  return [(Slice(path, k), header) for k, header in enumerate(headers)]


def _is_magnitude(header: pydicom.Dataset) -> bool:
  """Whether a slice is no phase, real or imaginary image, by its ComplexImageComponent (enhanced files) or
  else its ImageType (classic ones)."""
  if component := header.get('ComplexImageComponent'):
    return component not in ('PHASE', 'REAL', 'IMAGINARY')
  return not _NOT_MAGNITUDE.intersection(str(v).upper() for v in list(header.get('ImageType') or [])[2:])


def _echo_time(header: pydicom.Dataset) -> float | None:
  """An enhanced frame's EffectiveEchoTime or a classic image's EchoTime (ms); None when absent."""
  value = header.get('EffectiveEchoTime', header.get('EchoTime'))
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


class _Scan(NamedTuple):
  groups: dict[tuple[str, int | None], Members]  # by (SeriesInstanceUID, echo)
  skipped: dict[str | None, list[str]]  # why each file left out was, by its series (None: unknown)
  localizers: dict[str, int]  # slices left out of a series as localizers (`_without_localizers`)


def _without_localizers(members: Members) -> Members:
  """The members that are no localizer: not marked one by their ImageType (as GE marks them), and lying
  in the plane most of the others share (normals within 10 degrees, either way); members without a
  readable orientation stay (`_geometry` refuses them)."""
  marked = ['LOCALIZER' in [str(v).upper() for v in list(h.get('ImageType') or [])] for _, h in members]
  members = [m for m, localizer in zip(members, marked) if not localizer] or members
  normals = [None if (c := _floats(h, 'ImageOrientationPatient', 6)) is None else np.cross(c[:3], c[3:])
             for _, h in members]
  normals = [n / norm if n is not None and (norm := np.linalg.norm(n)) > 0.5 else None for n in normals]
  known = np.array([n for n in normals if n is not None]).reshape(-1, 3)
  if not len(known):
    return members
  main = known[np.argmax((np.abs(known @ known.T) > _PLANE_COS).sum(axis=1))]
  return [m for m, n in zip(members, normals) if n is None or abs(n @ main) > _PLANE_COS]


def _scan(folder: pathlib.Path) -> _Scan:
  """Headers (no pixels) of the DICOM images under folder (`_frames`: one per slice), grouped by
  (SeriesInstanceUID, echo): a series whose slices carry several EchoNumbers (a DESS or multi-echo series
  exported as one) is one group per echo, as dcm2niix writes one volume per echo; the echo is None
  otherwise. Without EchoNumbers the slices are numbered by the rank of their echo time in the series
  (an enhanced file's frames, whose echoes may come in one file or one file each, or classic images). A
  second copy of an instance (the same SOPInstanceUID, as a series exported twice) is left out, and so are
  phase, real and imaginary images beside magnitude ones, and localizers exported under the series' UID
  (`_without_localizers`). A file whose header cannot be read or whose frames cannot be placed is left
  out with its reason, for `read_series` to decide on: a broken file of another series (a partly copied
  slice, a multi-frame secondary capture) does not stop this one."""
  if not folder.is_dir():
    raise DataError(f'{folder}: not a directory (expected a folder of DICOM files)')
  series: dict[str, Members] = {}
  skipped: dict[str | None, list[str]] = {}
  for path in files(folder):
    if not is_dicom_file(path):
      continue
    uid = None
    try:
      ds = _read(path, stop_before_pixels=True)
      uid = str(ds.get('SeriesInstanceUID') or '') or None
      if 'Rows' not in ds or uid is None:
        # Images only: a DICOMDIR, a structured report or a presentation state has no Rows and no pixels; an
        # image (by its SOP class, in the file meta too) without them is a file cut short.
        sop_class = ds.get('SOPClassUID') or getattr(ds, 'file_meta', {}).get('MediaStorageSOPClassUID')
        if 'Image Storage' in pydicom.uid.UID(str(sop_class or '')).name:
          raise EOFError('an image without Rows or SeriesInstanceUID: the file cut short?')
        continue
      members = _frames(path, ds)  # inside: pydicom parses a truncated per-frame sequence only here
    except DataError as e:
      skipped.setdefault(uid, []).append(str(e))
      continue
    except _READ_ERRORS as e:
      skipped.setdefault(uid, []).append(f'{path}: DICOM header unreadable ({one_line(e)})')
      continue
    series.setdefault(uid, []).extend(members)
  groups: dict[tuple[str, int | None], Members] = {}
  localizers: dict[str, int] = {}
  for uid, members in series.items():
    unique: dict[tuple[str, int | None], tuple[Slice, pydicom.Dataset]] = {}
    for slice_, header in members:  # the first copy of an instance (files without SOPInstanceUID all)
      unique.setdefault((str(header.get('SOPInstanceUID') or slice_.path), slice_.frame), (slice_, header))
    members = [m for m in unique.values() if _is_magnitude(m[1])] or list(unique.values())
    if len(images := _without_localizers(members)) < len(members):
      localizers[uid] = len(members) - len(images)
      members = images
    times = [_echo_time(header) if header.get('EchoNumbers') is None else None for _, header in members]
    ranks = sorted({time for time in times if time is not None})
    for (slice_, header), time in zip(members, times):
      if len(ranks) > 1 and time is not None:
        header.EchoNumbers = ranks.index(time) + 1
      groups.setdefault((uid, _int(header, 'EchoNumbers')), []).append((slice_, header))
  if not groups:
    reasons = [reason for reasons in skipped.values() for reason in reasons]
    raise DataError(reasons[0] if len(reasons) == 1 else
                    f'{folder}: no DICOM image file found (searched recursively; expected the exported files '
                    'of an MRI series)' + (f'; {len(reasons)} unreadable, the first: {reasons[0]}' if reasons
                                           else ''))
  echoes = collections.Counter(uid for uid, _ in groups)
  # One echo number (or none) throughout: the series is one volume, whatever its files say of the echo.
  return _Scan({(uid, echo if echoes[uid] > 1 else None): members for (uid, echo), members in groups.items()},
               skipped, localizers)


def _slice_order(members: Members) -> Members:
  """Members sorted by position along the first slice's normal, the order GDCM gives; by InstanceNumber (or
  a frame's InStackPositionNumber) then name where geometry is missing (read_series then refuses the
  series)."""
  cosines = _floats(members[0][1], 'ImageOrientationPatient', 6)
  positions = [_floats(ds, 'ImagePositionPatient', 3) for _, ds in members]
  if cosines is None or any(p is None for p in positions):
    def instance(member):
      number = _int(member[1], 'InstanceNumber') or _int(member[1], 'InStackPositionNumber') or 0
      return number, member[0].path, member[0].frame or 0
    return sorted(members, key=instance)
  normal = np.cross(cosines[:3], cosines[3:])
  order = sorted(range(len(members)),
                 key=lambda n: (float(positions[n] @ normal), members[n][0].path, members[n][0].frame or 0))
  return [members[n] for n in order]


def _series_list(groups: dict[tuple[str, int | None], Members]) -> list[Series]:
  series = []
  for (uid, echo), members in groups.items():
    first = members[0][1]
    slices = tuple(slice_ for slice_, _ in _slice_order(members))
    series.append(Series(uid, str(first.get('SeriesDescription') or ''), _int(first, 'SeriesNumber'), slices,
                         echo))
  return sorted(series, key=lambda s: (-len(s.slices), s.number is None, s.number or 0, s.uid, s.echo or 0))


def find_series(folder: str | pathlib.Path) -> list[Series]:
  """Every image series under folder (recursive), read without pixels, grouped by SeriesInstanceUID and echo
  (`_scan`), the one with most slices first (of one series' echoes, the first echo). DataError if there is
  none."""
  return _series_list(_scan(pathlib.Path(folder)).groups)


def _describe(series: Series) -> str:
  return f'{series.name} ({series.description!r}, {len(series.slices)} slices)'


def _geometry(where: str, members: Members) -> tuple[np.ndarray, float]:
  """The LPS voxel-to-world affine of slices sorted along the normal, and the mean slice spacing in mm."""
  if len(members) < 2:
    raise DataError(f'{where}: {len(members)} slice, a volume needs at least 2 (is this a localizer?)')
  geometry = []
  for slice_, ds in members:
    values = {tag: _floats(ds, tag, count) for tag, count in _GEOMETRY_TAGS.items()}
    missing = [tag for tag, value in values.items() if value is None]
    if missing:
      raise DataError(f'{where}: {slice_} lacks {", ".join(missing)} (or holds unreadable values), '
                      'so its slice cannot be placed in space')
    geometry.append(((int(ds.Rows), int(ds.Columns)), values))
  first_slice, (first_size, first) = members[0][0], geometry[0]
  for (slice_, _), (size, values) in zip(members[1:], geometry[1:]):
    for what, a, b in (('Rows/Columns', first_size, size),
                       ('PixelSpacing', first['PixelSpacing'], values['PixelSpacing']),
                       ('ImageOrientationPatient', first['ImageOrientationPatient'],
                        values['ImageOrientationPatient'])):
      if np.shape(a) != np.shape(b) or not np.allclose(a, b, rtol=0, atol=_SAME_TOL):
        raise DataError(f'{where}: mixed-size series, {what} {np.round(a, 5).tolist()} in {first_slice} '
                        f'but {np.round(b, 5).tolist()} in {slice_} (export or pick one series alone)')
  if (first['PixelSpacing'] <= 0).any():
    raise DataError(f'{where}: PixelSpacing {first["PixelSpacing"].tolist()} in {first_slice}, expected two '
                    'positive sizes (mm)')
  row, column = first['ImageOrientationPatient'][:3], first['ImageOrientationPatient'][3:]
  normal = np.cross(row, column)
  if np.linalg.norm(normal) < 0.5:
    raise DataError(f'{where}: degenerate ImageOrientationPatient {np.concatenate([row, column]).tolist()} '
                    f'in {first_slice}')
  positions = np.stack([values['ImagePositionPatient'] for _, values in geometry])
  steps = np.diff(positions @ normal)
  if (steps < _DUPLICATE_TOL_MM).any():
    n = int(np.argmin(steps))
    raise DataError(f'{where}: duplicate slice positions, {members[n][0]} and {members[n + 1][0]} '
                    f'both at {np.round(positions[n], 4).tolist()} mm (several echoes, phases or copies in '
                    'one series?)')
  median = float(np.median(steps))
  if (np.abs(steps - median) > max(_SPACING_TOL * median, _SPACING_TOL_MM)).any():
    raise DataError(f'{where}: uneven slice spacing, steps from {steps.min():.4g} to {steps.max():.4g} mm '
                    f'(median {median:.4g}; missing slices or an interleaved series?)')
  # The mean step from the first slice to the last keeps every slice where its header puts it, in a sheared
  # (gantry-tilted) stack too, where ITK puts normal * |step| instead; otherwise the two are the same.
  step = (positions[-1] - positions[0]) / (len(members) - 1)
  spacing = first['PixelSpacing']  # (between rows, between columns)
  affine = np.eye(4)
  affine[:3, 0], affine[:3, 1], affine[:3, 2] = row * spacing[1], column * spacing[0], step
  affine[:3, 3] = positions[0]
  return affine, float(np.linalg.norm(step))


def _pixels(path: pathlib.Path, multi_frame: bool) -> np.ndarray:
  """A file's stored values: (rows, columns), or (frames, rows, columns) for a multi-frame file."""
  try:
    ds = _read(path)
    pixels = ds.pixel_array
    shape = (int(ds.Rows), int(ds.Columns))
  except (*_READ_ERRORS, AttributeError, NotImplementedError, RuntimeError) as e:
    raise DataError(f'{path}: pixel data unreadable ({one_line(e)})') from None
  if multi_frame:
    shape = (_int(ds, 'NumberOfFrames') or 1, *shape)
  if pixels.size != np.prod(shape):
    raise DataError(f'{path}: pixel array of shape {pixels.shape}, expected grayscale images of {shape}')
  if str(ds.get('PhotometricInterpretation') or '').strip() == 'MONOCHROME1':
    # Stored to be shown inverted (the lowest value white): turned round within the stored values' range,
    # as GDCM (SimpleITK) reads it, so that the image has the contrast the model learnt.
    bits = _int(ds, 'BitsStored') or pixels.dtype.itemsize * 8
    low, high = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if _int(ds, 'PixelRepresentation') else
                 (0, (1 << bits) - 1))
    pixels = (low + high) - pixels.astype(np.int64)
  return pixels.reshape(shape)


def _volume(members: Members) -> np.ndarray:
  """The members' slices as float32 (column, row, slice), each rescaled by its own RescaleSlope and
  RescaleIntercept; each file is decoded once."""
  decoded: dict[pathlib.Path, np.ndarray] = {}
  slices = []
  for slice_, header in members:
    if slice_.path not in decoded:
      decoded[slice_.path] = _pixels(slice_.path, multi_frame=slice_.frame is not None)
    pixels = decoded[slice_.path] if slice_.frame is None else decoded[slice_.path][slice_.frame]
    try:
      slope, intercept = (float(header.get(keyword) or default)
                          for keyword, default in (('RescaleSlope', 1.0), ('RescaleIntercept', 0.0)))
    except (TypeError, ValueError) as e:
      raise DataError(f'{slice_}: unreadable RescaleSlope or RescaleIntercept ({one_line(e)})') from None
    values = pixels.T.astype(np.float64) * slope + intercept
    if not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float32).max:
      raise DataError(f'{slice_}: RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values '
                      'that are not finite or beyond float32 (3.4e38)')
    slices.append(values.astype(np.float32))
  return np.stack(slices, axis=-1)


def description_side(description: str) -> str | None:
  """'R' or 'L' where a series description's words name one side only (OAI's SAG_3D_DESS_RIGHT; RIGHT, RT,
  LEFT and LT count, single letters do not), else None."""
  sides = {_DESCRIPTION_SIDES[word] for word in re.findall('[A-Z]+', description.upper())
           if word in _DESCRIPTION_SIDES}
  return sides.pop() if len(sides) == 1 else None


def _laterality(ds: pydicom.Dataset, description: str) -> tuple[str | None, str | None]:
  """(side, where it was read, e.g. 'the DICOM ImageLaterality tag'): the laterality tags, else
  `description_side`; (None, None) without."""
  for keyword in ('Laterality', 'ImageLaterality', 'FrameLaterality'):
    value = str(ds.get(keyword) or '').strip().upper()
    if value in ('L', 'R'):
      return value, f'the DICOM {keyword} tag'
  if side := description_side(description):
    return side, f"the series description '{description}'"
  return None, None


def read_series(folder: str | pathlib.Path, series: str | None = None) -> tuple[nib.Nifti1Image, dict]:
  """One series as a float32 NIfTI image with its RAS affine (qform and sform code 1), and a report.

  Voxel (i, j, k) is (column, row, slice), slices ascending along cross(row cosine, column cosine), each
  rescaled by its own RescaleSlope and RescaleIntercept. `series` is a `Series.name` (a SeriesInstanceUID,
  its first echo where it holds several; '<uid>:<echo>' for another); without it the series with most slices
  is read. The report holds 'series_found' (a list of dicts of name, description, number and slice
  count, one per series), 'series_used' (a name), 'laterality' ('L', 'R' or None) and 'laterality_from'
  (where it was read: the Laterality, ImageLaterality or FrameLaterality tag, else the series
  description), 'description', 'manufacturer' and 'slice_spacing_mm'.
  """
  folder = pathlib.Path(folder)
  groups, skipped, localizers = _scan(folder)
  found = _series_list(groups)
  chosen = found[0] if series is None else next((s for s in found if series in (s.name, s.uid)), None)
  if chosen is None:
    uid, _, echo = series.partition(':')
    if echo and any(s.uid == uid and s.echo is None for s in found):
      raise DataError(f'{folder}: series {uid} holds one echo, which --series names by its UID alone: '
                      f'--series={uid}')
    raise DataError(f'{folder}: no series {series}; found {"; ".join(_describe(s) for s in found)}')
  if series is None:
    patients = sorted({str(members[0][1].get('PatientID') or '') for members in groups.values()} - {''})
    if len(patients) > 1:  # one knee of one of them would be taken
      raise DataError(f'{folder}: DICOM series of {len(patients)} patients ({", ".join(patients)}): give '
                      "each patient's folder as a scan (a directory of them with an --output folder segments "
                      'each), or pick a series with --series')
    if tied := [s for s in found[1:] if len(s.slices) == len(chosen.slices) and s.uid != chosen.uid]:
      logging.warning('%s: %d series of %d slices: %s used (the lowest SeriesNumber), not %s (both knees of '
                      'one study?); --series=<uid> takes another', folder, len(tied) + 1, len(chosen.slices),
                      _describe(chosen), '; '.join(_describe(s) for s in tied))
  if chosen.uid in skipped:  # a file of this very series: its slices would be missing
    raise DataError(skipped[chosen.uid][0])
  if chosen.uid in localizers:
    logging.warning('%s: series %s: %d localizer slice(s) (marked so, or in another plane than its other %d) '
                    'left out', folder, chosen.uid, localizers[chosen.uid],
                    sum(len(members) for (uid, _), members in groups.items() if uid == chosen.uid))
  if others := [reason for reasons in skipped.values() for reason in reasons]:
    logging.warning('%s: %d DICOM file(s) left out, of other series or unreadable (if of this series, '
                    'slices are missing): %s', folder, len(others), '; '.join(others[:3]))
  headers = dict(groups[chosen.uid, chosen.echo])
  members = [(slice_, headers[slice_]) for slice_ in chosen.slices]
  affine, slice_spacing = _geometry(f'{folder}: series {_describe(chosen)}', members)
  affine = volumes.LPS_TO_RAS @ affine  # DICOM's patient x and y point left and posterior, NIfTI's right
  nii = nib.Nifti1Image(_volume(members), affine)
  nii.set_qform(affine, code=1)
  nii.set_sform(affine, code=1)
  nii.header.set_xyzt_units('mm')
  first = members[0][1]
  side, side_from = _laterality(first, chosen.description)
  report = {
    'series_found': [{'name': s.name, 'description': s.description, 'number': s.number,
                      'slices': len(s.slices)} for s in found],
    'series_used': chosen.name,
    'laterality': side,
    'laterality_from': side_from,
    'description': chosen.description,
    'manufacturer': str(first.get('Manufacturer') or ''),
    'slice_spacing_mm': slice_spacing,
  }
  return nii, report
