"""Volumes (NIfTI; NIfTI pairs, ITK's MetaImage and NRRD for reading): discovery of image/label pairs,
checks, loading in canonical RAS order, label remapping, saving."""

import bz2
import collections
import contextlib
import gzip
import io
import itertools
import json
import os
import pathlib
import re
import shlex
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np
from absl import logging

from configs import eas
from easunet_jax import atomic
from easunet_jax.errors import ConfigError, DataError, one_line

_AFFINE_TOL_MM = 1e-3  # image and label affines may differ by rounding only
# OAI-ZIB's femur and tibia: expected in label files and sent to background by the usual label maps.
BONE_LABELS = (1, 3)
# OAI-ZIB's femoral and tibial cartilage labels, and the training class each becomes under the default
# data.label_map ((2, 1), (4, 2)): the classes that evaluation and prediction report.
OAI_ZIB_CARTILAGE = {'fc': 2, 'tc': 4}
CLASSES = {'fc': 1, 'tc': 2}
NIFTI_SUFFIXES = ('.nii.gz', '.nii')
# A NIfTI pair: an .hdr header beside its .img voxels, as SPM and FSL may write. (An Analyze 7.5 .hdr, a
# NIfTI pair's forerunner without an orientation, is refused.)
NIFTI_PAIR_SUFFIXES = ('.hdr',)
# ITK's MetaImage: an .mhd header beside its data file, or an .mha holding both. OAI-ZIB releases its manual
# segmentations so (segmentation_masks/<id>.segmentation_masks.mhd), as SKI10 its images and labels.
METAIMAGE_SUFFIXES = ('.mhd', '.mha')
# NRRD: 3D Slicer's format for volumes, a .nrrd holding header and voxels or an .nhdr beside its data file.
NRRD_SUFFIXES = ('.nrrd', '.nhdr')
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NIFTI_PAIR_SUFFIXES + METAIMAGE_SUFFIXES + NRRD_SUFFIXES
_METAIMAGE_TYPES = {'MET_UCHAR': 'u1', 'MET_CHAR': 'i1', 'MET_USHORT': 'u2', 'MET_SHORT': 'i2',
                    'MET_UINT': 'u4', 'MET_INT': 'i4', 'MET_ULONG': 'u4', 'MET_LONG': 'i4',  # MetaIO's sizes
                    'MET_ULONG_LONG': 'u8', 'MET_LONG_LONG': 'i8', 'MET_FLOAT': 'f4', 'MET_DOUBLE': 'f8'}
# NRRD's type names (each has several spellings), as numpy dtypes.
_NRRD_TYPES = {
    **dict.fromkeys(('signed char', 'int8', 'int8_t'), 'i1'),
    **dict.fromkeys(('uchar', 'unsigned char', 'uint8', 'uint8_t'), 'u1'),
    **dict.fromkeys(('short', 'short int', 'signed short', 'signed short int', 'int16', 'int16_t'), 'i2'),
    **dict.fromkeys(('ushort', 'unsigned short', 'unsigned short int', 'uint16', 'uint16_t'), 'u2'),
    **dict.fromkeys(('int', 'signed int', 'int32', 'int32_t'), 'i4'),
    **dict.fromkeys(('uint', 'unsigned int', 'uint32', 'uint32_t'), 'u4'),
    **dict.fromkeys(('longlong', 'long long', 'long long int', 'signed long long', 'signed long long int',
                     'int64', 'int64_t'), 'i8'),
    **dict.fromkeys(('ulonglong', 'unsigned long long', 'unsigned long long int', 'uint64', 'uint64_t'),
                    'u8'),
    'float': 'f4', 'double': 'f8'}
# ITK's world coordinates are LPS, NIfTI's RAS: the first two change sign. NRRD names its space.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NRRD_SPACES = {'right-anterior-superior': np.eye(4), 'ras': np.eye(4),
                'left-posterior-superior': LPS_TO_RAS, 'lps': LPS_TO_RAS,
                'left-anterior-superior': np.diag([-1.0, 1.0, 1.0, 1.0]),
                'las': np.diag([-1.0, 1.0, 1.0, 1.0])}
# NIfTI's spatial unit codes other than mm (2): the metre (1) and the micron (3), in xyzt_units' low bits.
_MM_PER_UNIT = {1: 1000.0, 3: 0.001}
# What a truncated, corrupt or foreign file raises inside nibabel, gzip and zlib.
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError, OverflowError, nib.filebasedimages.ImageFileError,
                nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError)


class Case(NamedTuple):
  id: str
  image: pathlib.Path | None  # None: a label map alone (a data set of labels, for data.synth)
  label: pathlib.Path | None  # None: an image without a label, predictable but not usable for training


def broken_link(path: str | pathlib.Path) -> str | None:
  """'a broken link (to <its target>)' where `path` links to what is gone (an unmounted disk, a moved data
  set), else None."""
  if os.path.islink(path) and not os.path.exists(path):
    return f'a broken link (to {os.readlink(path)})'
  return None


def check_not_broken_link(path: pathlib.Path) -> None:
  """A broken link (`broken_link`) is a DataError naming its target, not a missing file or folder."""
  if why := broken_link(path):
    raise DataError(f'{path}: {why}')


def volume_stem(name: str) -> str:
  """The file name without its volume suffix (`VOLUME_SUFFIXES`, in any case: some exports are named
  .NII.GZ, which nibabel and ITK read); '' for any other file."""
  for suffix in VOLUME_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return ''


def label_file(label_dir: pathlib.Path, case_id: str) -> pathlib.Path | None:
  """`label_dir`'s volume file of `case_id` (<case_id> with one of `VOLUME_SUFFIXES`, in any case), or
  None."""
  def is_file(path: pathlib.Path) -> bool:  # or a link to a file that is gone, for its check to name
    return path.is_file() or path.is_symlink()

  named = (p for suffix in VOLUME_SUFFIXES if is_file(p := label_dir / f'{case_id}{suffix}'))
  # Upper-case suffixes only where no lower-case one is: listing the folder for every case is the slow way.
  return next(named, None) or next(
      (p for p in sorted(label_dir.iterdir()) if volume_stem(p.name) == case_id and is_file(p)), None)


def discover_cases(root: str | pathlib.Path) -> list[Case]:
  """Images under root (images/+labels/ or nnU-Net imagesTr/+labelsTr/) with their labels, sorted by id.

  An image without a label is returned with label None: predictable, and for the caller to report. A label
  map without an image (beside images, or in a root with label maps only: labels/ or labelsTr/ and no image
  folder or an empty one, or OAI-ZIB's release: its [segmentation/]segmentation_masks/<id>.segmentation_masks
  .mhd) is a case with image None, which contrast synthesis (data.synth) trains on.
  """
  root = pathlib.Path(root)
  for folder in ('images', 'labels', 'imagesTr', 'labelsTr'):  # else read as missing, and the layout changes
    check_not_broken_link(root / folder)
  # The layout whose folders hold volumes: an empty or partial folder of the other is no reason to read it.
  filled = {layout: any(volume_files(root / folder) for folder in folders)
            for layout, folders in (('nnunet', ('imagesTr', 'labelsTr')), ('plain', ('images', 'labels')))}
  if all(filled.values()):
    raise DataError(f'{root}: volumes in both images/ + labels/ and imagesTr/ + labelsTr/; keep one layout, '
                    'or give data.root a folder of its own for each')
  nnunet = filled['nnunet'] or (not filled['plain'] and any(
      (root / folder).is_dir() for folder in ('imagesTr', 'labelsTr')))
  if nnunet:
    image_dir, label_dir, image_suffix = root / 'imagesTr', root / 'labelsTr', '_0000'
    if unread := [folder for folder in ('imagesTs', 'labelsTs') if (root / folder).is_dir()]:
      # The command that scores them: predict of this run's model (its --config and --workdir).
      score = (f"; to segment imagesTs/, add --mode=predict --input={shlex.quote(str(root / 'imagesTs'))} "
               '--output=<a folder>'
               + (f" --labels={shlex.quote(str(root / 'labelsTs'))}" if 'labelsTs' in unread else '')
               + " to this run's --config and --workdir" if 'imagesTs' in unread else '')
      logging.warning('%s: %s not read; the test split is drawn from labelsTr/ (data.split), or named by '
                      'data.split_file%s', root, ' and '.join(f'{folder}/' for folder in unread), score)
  else:
    image_dir, label_dir, image_suffix = root / 'images', root / 'labels', ''
  images = volume_files(image_dir)
  if not images:
    label_suffix = ''
    # OAI-ZIB's release (label maps without pose, of DESS scans stored sagittal, posterior, superior), at
    # its top folder or its segmentation/ folder; its classification/ folder labels bones only.
    zib = [d for d in (root, root / 'segmentation') if (d / 'segmentation_masks').is_dir()]
    if not label_dir.is_dir() and zib:
      if zib[0].resolve().name == 'classification':
        raise DataError(f"{root}: OAI-ZIB's classification/ masks label bones only (1 femur, 2 tibia, read "
                        'here as femoral cartilage); its segmentation/ folder holds the cartilage labels')
      label_dir, label_suffix = zib[0] / 'segmentation_masks', '.segmentation_masks'
    if files := [(stem.removesuffix(label_suffix), path) for stem, path in volume_files(label_dir)]:
      _one_file_per_case(files)
      return [Case(case_id, None, path) for case_id, path in files]
    raise DataError(f'{root}: expected images/ + labels/ or imagesTr/ + labelsTr/ with .nii.gz volumes '
                    "(or labels/ alone for data.synth, or OAI-ZIB's segmentation_masks/)"
                    + (f'; {image_dir.name}/ holds no volume file' if image_dir.is_dir() else ''))
  cases, ignored = [], []
  for stem, image in images:
    if not stem.endswith(image_suffix):
      ignored.append(image.name)
      continue
    case_id = stem[:len(stem) - len(image_suffix)]
    cases.append(Case(case_id, image, label_file(label_dir, case_id) if label_dir.is_dir() else None))
  if not cases:
    raise DataError(f'{image_dir}: no image found (expected <id>{image_suffix}.nii.gz)')
  if ignored:  # other channels (_0001, ...), which this one-channel model cannot use, or misnamed images
    logging.warning('%s: %d volume file(s) not named <id>_0000 ignored (other channels, or misnamed): %s',
                    image_dir, len(ignored), ', '.join(ignored[:5]) + (', ...' if len(ignored) > 5 else ''))
  _one_file_per_case([(c.id, c.image) for c in cases])
  labels = volume_files(label_dir)
  _one_file_per_case(labels)  # else label_file would pick one of them unsaid
  # By id, not path: on a case-insensitive file system label_file's c0.nii.gz is the folder's c0.NII.GZ.
  ids = {c.id for c in cases}
  cases += [Case(stem, None, path) for stem, path in labels if stem not in ids]
  return sorted(cases, key=lambda c: c.id)


def volume_files(folder: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """(stem, path) of `folder`'s volume files (`volume_stem`; hidden files left out), sorted; none where the
  folder is missing."""
  if not folder.is_dir():
    return []
  return [(stem, path) for path in sorted(folder.iterdir())
          if (stem := volume_stem(path.name)) and not path.name.startswith('.')]


_OTHER_TISSUES = {'background', 'femur', 'tibia', 'fibula', 'patella', 'bone', 'bones', 'fluid', 'effusion',
                  'ligament', 'tendon', 'muscle', 'fat', 'marrow'}


def _cartilage_class(name: str) -> int:
  """The training class (`CLASSES`) of femoral or tibial cartilage that a label's name in nnU-Net's
  dataset.json names ('femoral_cartilage', 'Tibial Cartilage medial', 'femoral cart', 'MTC', ...); 0 for any
  other name (bones, patellar cartilage, menisci, a name it cannot read)."""
  name = name.lower()
  words = set(re.findall('[a-z]+', name))
  femoral = bool(words & {'fc', 'mfc', 'lfc'}) or ('cart' in name and 'fem' in name)
  tibial = bool(words & {'tc', 'mtc', 'ltc'}) or ('cart' in name and 'tib' in name)
  if femoral == tibial:  # neither, or both ('femorotibial cartilage')
    return 0
  return CLASSES['fc'] if femoral else CLASSES['tc']


def _other_tissue(name: str) -> bool:
  """Whether a label's name in dataset.json names a tissue that is no cartilage of any kind: a bone, a
  meniscus, fluid, background."""
  words = set(re.findall('[a-z]+', name.lower()))
  tissue = words & _OTHER_TISSUES or any(w.startswith('menisc') for w in words)
  return 'cart' not in name.lower() and bool(tissue)


def check_dataset_json(root: str | pathlib.Path, label_map: Sequence[Sequence[int]]) -> None:
  """A ConfigError where root/dataset.json (nnU-Net's: {"labels": {name: value}}, or v1's {value: name})
  names a label femoral or tibial cartilage that `label_map` leaves out or makes another class, or a tissue
  that is no cartilage (a bone, a meniscus) that it makes cartilage; a warning where it names another label
  (menisci, patellar cartilage, a name it cannot read) that the map does not read, whose cases would be
  skipped; each with a map that follows the names and reads every label the file names. A warning, not an
  error: a workdir trained on the map resumes and evaluates with it, and a label no case holds costs
  nothing. Nothing where the file is absent or not nnU-Net's."""
  path = pathlib.Path(root) / 'dataset.json'
  if not path.is_file():
    return
  try:
    labels = json.loads(path.read_bytes()).get('labels')  # UTF-8 (with or without a BOM), -16, -32
  except (ValueError, AttributeError):  # another tool's JSON: not ours to judge
    return
  if not isinstance(labels, dict):
    return
  if all(str(key).isdigit() for key in labels):  # nnU-Net v1: {"0": "background", ...}
    labels = {str(name): int(value) for value, name in labels.items()}
  named = {value: target for name, value in labels.items()  # region lists ([4, 5]) left out
           if isinstance(value, int) and (target := _cartilage_class(str(name)))}
  mapped = {int(source): int(target) for source, target in label_map}
  # The map suggested reads every value the file names: the cartilage as named, tissues that are no
  # cartilage (a tibia where OAI-ZIB's tibial cartilage is, menisci) as background, the given pairs of the
  # other values (patellar cartilage joined to a plate, names it cannot read), and the labels the map leaves
  # out (bones other than OAI-ZIB's) as background.
  others = {value: 0 for value in labels.values()
            if isinstance(value, int) and value > 0 and value not in named and value not in BONE_LABELS}
  tissues = {value: 0 for name, value in labels.items()
             if isinstance(value, int) and (value in others or value in mapped) and _other_tissue(str(name))}
  given = {value: target for value, target in mapped.items() if value not in named}
  pairs = tuple(sorted({**others, **given, **tissues, **named}.items()))
  suggested = (f"pass --config.data.label_map='{pairs}' (predict with the shipped model: {eas.SHIPPED_FLAGS} "
               '--config.data.label_map=...)')

  def name_of(value: int) -> str:
    return repr(next(name for name, v in labels.items() if v == value))

  if wrong := [value for value, target in named.items() if mapped.get(value, 0) != target]:
    value = wrong[0]
    does = f'makes it class {mapped[value]}' if mapped.get(value) else 'leaves it out'
    raise ConfigError(f'{path} names label {value} {name_of(value)}, class {named[value]} (1 femoral, 2 '
                      f'tibial cartilage), and data.label_map {does}: {suggested}')
  if as_cartilage := [value for value in tissues if mapped.get(value) in CLASSES.values()]:
    value = as_cartilage[0]
    raise ConfigError(f'{path} names label {value} {name_of(value)}, no cartilage, and data.label_map makes '
                      f'it class {mapped[value]} (1 femoral, 2 tibial cartilage): {suggested}')
  if unread := sorted(set(others) - set(mapped)):
    logging.warning('%s names label %d %s, which data.label_map %s does not read: a case holding it is '
                    'skipped (in training) or unscored (by predict --labels); to read it as background, %s',
                    path, unread[0], name_of(unread[0]), tuple(map(tuple, label_map)), suggested)


def _one_file_per_case(files: Sequence[tuple[str, pathlib.Path]]) -> None:
  """A DataError naming them where one case id of (case id, path) `files` (one folder's images, or its
  label maps) comes as two files (of .nii.gz, .nii, .mhd, ...)."""
  counts = collections.Counter(case_id for case_id, _ in files)
  if twice := sorted(i for i, n in counts.items() if n > 1):
    paths = [path for case_id, path in files if case_id == twice[0]]
    raise DataError(f'{paths[0].parent}: case {twice[0]} comes as {len(paths)} files '
                    f'({", ".join(p.name for p in paths)}; {len(twice)} case(s) so): keep one per case')


def _metaimage_header(path: pathlib.Path) -> tuple[dict[str, str], int]:
  """A MetaImage header's fields and the byte where it ends (where an .mha's voxels begin)."""
  fields = {}
  with open(path, 'rb') as f:
    while 'ElementDataFile' not in fields:  # the header's last field
      line = f.readline()
      if not line:
        raise ValueError('no ElementDataFile field')
      key, _, value = line.decode('latin-1').partition('=')
      fields[key.strip()] = value.strip()
    return fields, f.tell()


def _nrrd_header(path: pathlib.Path) -> tuple[dict[str, str], int]:
  """A NRRD header's fields (keys lower-case) and the byte where it ends (where a .nrrd's voxels begin)."""
  fields = {}
  with open(path, 'rb') as f:
    if not f.readline().startswith(b'NRRD'):
      raise ValueError('no NRRD magic line')
    while (line := f.readline().decode('latin-1').rstrip('\r\n')):  # a blank line ends the header
      if not line.startswith('#') and ': ' in line:
        key, _, value = line.partition(': ')
        fields[key.strip().lower()] = value.strip()
    return fields, f.tell()


def data_file(path: pathlib.Path) -> pathlib.Path:
  """The file that holds a volume's voxels: the data file an .mhd or .nhdr header names, a NIfTI pair's
  .img, else the file itself (also when the header cannot be read: loading it reports that)."""
  try:
    if path.name.lower().endswith(NIFTI_PAIR_SUFFIXES):
      return pathlib.Path(nib.Nifti1Pair.filespec_to_file_map(path)['image'].filename)
    if path.name.lower().endswith(METAIMAGE_SUFFIXES):
      named = _metaimage_header(path)[0]['ElementDataFile']
      return path if named == 'LOCAL' else path.parent / named
    if path.name.lower().endswith(NRRD_SUFFIXES):
      named = _nrrd_header(path)[0].get('data file')
      return path.parent / named if named else path
  except (OSError, ValueError):
    pass
  return path


def _metaimage(path: pathlib.Path) -> nib.Nifti1Image:
  """A MetaImage file as a NIfTI image with the same voxels and pose (LPS made RAS). Uncompressed voxels
  stay on disk behind a lazy proxy, as a .nii file's do, so header-only checks do not read them; zlib-
  compressed ones are read here."""
  try:
    fields, header_end = _metaimage_header(path)
    local = fields['ElementDataFile'] == 'LOCAL'
    compressed = fields.get('CompressedData', 'False').lower() in ('true', '1')
    shape = [int(n) for n in fields['DimSize'].split()]
    if int(fields.get('ElementNumberOfChannels', 1)) != 1:
      raise ValueError(f'{fields["ElementNumberOfChannels"]} channels per voxel, expected 1 (a colour or '
                       "vector image, or a complex scan's two parts as ITK writes it: save its magnitude)")
    big_endian = fields.get('BinaryDataByteOrderMSB', fields.get('ElementByteOrderMSB', 'False'))
    if fields['ElementType'] not in _METAIMAGE_TYPES:
      raise ValueError(f'element type {fields["ElementType"]} not supported')
    dtype = np.dtype(_METAIMAGE_TYPES[fields['ElementType']]).newbyteorder(
        '>' if big_endian.lower() in ('true', '1') else '<')
    data_path = path if local else path.parent / fields['ElementDataFile']
    nbytes, header_size = int(np.prod(shape)) * dtype.itemsize, int(fields.get('HeaderSize', 0))
    if compressed:
      data = zlib.decompress(data_path.read_bytes()[header_end if local else 0:])
      data = data[len(data) - nbytes:] if header_size == -1 else data[header_size:]
      # x runs fastest in the file: (z, y, x) in C order is (x, y, z) transposed. A copy: writable.
      voxels = np.frombuffer(data, dtype, nbytes // dtype.itemsize).reshape(shape[::-1]).T.copy()
    else:
      size = data_path.stat().st_size  # a missing data file is an error here, not at the first read
      offset = size - nbytes if header_size == -1 else (header_end if local else 0) + header_size
      voxels = nib.arrayproxy.ArrayProxy(str(data_path), (tuple(shape), dtype, offset), order='F')
    n = len(shape)
    # MetaIO falls back to ElementSize (the voxel's extent) where the spacing is not given
    spacing = [float(v) for v in fields.get('ElementSpacing', fields.get('ElementSize', ' '.join(['1'] * n))
                                            ).split()]
    origin = next((fields[k] for k in ('Offset', 'Origin', 'Position') if k in fields), '0 ' * n).split()
    matrix = next((fields[k] for k in ('TransformMatrix', 'Rotation', 'Orientation') if k in fields),
                  ' '.join(str(float(i == j)) for i in range(n) for j in range(n))).split()
    if n < 3:
      raise DataError(f'{path}: {n}D volume of shape {tuple(shape)}, expected 3D')
    # As ITK reads them: the first n spacings and origin coordinates, more ignored.
    if len(spacing) < n or len(origin) < n or len(matrix) != n * n:
      raise ValueError(f'{n} axes, and {len(spacing)} spacings, {len(origin)} origin coordinates and '
                       f'{len(matrix)} direction numbers (expected {n}, {n} and {n * n})')
    affine = np.eye(4)
    # Each run of n numbers in TransformMatrix is the direction of one voxel axis (a column of the affine).
    affine[:3, :3] = np.reshape(np.array(matrix, float), (n, n))[:3, :3].T * spacing[:3]
    affine[:3, 3] = np.array(origin, float)[:3]
  except KeyError as e:
    raise DataError(f'{path}: not a readable MetaImage file (no {e.args[0]} field)') from None
  except (OSError, ValueError, zlib.error) as e:
    raise DataError(f'{path}: not a readable MetaImage file ({one_line(e)})') from None
  _check_affine(path, affine)
  return nib.Nifti1Image(voxels, LPS_TO_RAS @ affine, dtype=dtype)  # the dtype: nibabel refuses int64 else


def _nrrd(path: pathlib.Path) -> nib.Nifti1Image:
  """A NRRD file (.nrrd, or an .nhdr header naming its data file) as a NIfTI image with the same voxels and
  pose (its space made RAS). Raw voxels stay on disk behind a lazy proxy; gzip- and bzip2-compressed ones
  are read here."""
  try:
    fields, header_end = _nrrd_header(path)
    sizes = [int(n) for n in fields['sizes'].split()]
    if fields['type'].lower() not in _NRRD_TYPES:
      raise ValueError(f"type {fields['type']} not supported")
    dtype = np.dtype(_NRRD_TYPES[fields['type'].lower()])
    if dtype.itemsize > 1:
      dtype = dtype.newbyteorder('>' if fields['endian'].lower() == 'big' else '<')
    encoding = fields.get('encoding', 'raw').lower()
    if encoding not in ('raw', 'gzip', 'gz', 'bzip2', 'bz2'):
      raise ValueError(f'encoding {encoding} not supported (raw, gzip or bzip2)')
    data_path = path.parent / fields['data file'] if 'data file' in fields else path
    offset = 0 if 'data file' in fields else header_end
    with open(data_path, 'rb') as f:  # a missing data file is an error here, not at the first read
      f.seek(offset)  # the lines skipped follow the header (in the data file: its first)
      for _ in range(int(fields.get('line skip', 0))):
        offset += len(f.readline())
    nbytes, byte_skip = int(np.prod(sizes)) * dtype.itemsize, int(fields.get('byte skip', 0))
    if encoding == 'raw':
      offset = data_path.stat().st_size - nbytes if byte_skip == -1 else offset + byte_skip
      voxels = nib.arrayproxy.ArrayProxy(str(data_path), (tuple(sizes), dtype, offset), order='F')
    else:
      with open(data_path, 'rb') as f:
        f.seek(offset)
        data = (gzip.decompress if encoding.startswith('gz') else bz2.decompress)(f.read())
      data = data[len(data) - nbytes:] if byte_skip == -1 else data[byte_skip:byte_skip + nbytes]
      voxels = np.frombuffer(data, dtype).reshape(sizes[::-1]).T.copy()  # the first axis runs fastest
    directions = re.findall(r'\(([^)]*)\)|none', fields.get('space directions', ''))
    space = fields.get('space', 'left-posterior-superior').lower()  # none named: ITK's LPS, as ITK reads it
    if space not in _NRRD_SPACES:
      raise ValueError(f'space {space} not supported ({", ".join(sorted(_NRRD_SPACES))})')
    if directions:
      spatial = [i for i, d in enumerate(directions) if d]
      columns = np.array([[float(v) for v in directions[i].split(',')] for i in spatial]).T
    else:  # no pose: the axes as stored, with the spacings given
      spatial = list(range(len(sizes)))
      columns = np.diag([float(v) for v in fields.get('spacings', ' '.join(['1'] * len(sizes))).split()])
    origin = [float(v) for v in fields.get('space origin', '(0,0,0)').strip('()').split(',')]
    if len(spatial) != 3 or any(sizes[i] != 1 for i in range(len(sizes)) if i not in spatial):
      raise DataError(f'{path}: volume of sizes {tuple(sizes)} with {len(spatial)} spatial axes, expected 3D')
    if columns.shape != (3, 3) or len(origin) != 3:
      raise ValueError(f'3 spatial axes, and directions or spacings of shape {columns.shape} and '
                       f'{len(origin)} origin coordinates (expected 3 x 3 and 3)')
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = origin
  except KeyError as e:
    raise DataError(f'{path}: not a readable NRRD file (no {e.args[0]} field)') from None
  except (OSError, ValueError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: not a readable NRRD file ({one_line(e)})') from None
  _check_affine(path, affine)
  if len(sizes) > 3:  # axes of length 1 that are not spatial (a vector or list axis of one component)
    voxels = np.asarray(voxels).reshape([sizes[i] for i in spatial])
  return nib.Nifti1Image(voxels, _NRRD_SPACES[space] @ affine, dtype=dtype)


@contextlib.contextmanager
def _nibabel_silent() -> Iterator[None]:
  """nibabel's header checks log each problem of a foreign or broken file (through its own handler and the
  root logger: three lines before the one-line error that says the same); silent while reading."""
  logger = nib.imageglobals.logger
  disabled, logger.disabled = logger.disabled, True
  try:
    yield
  finally:
    logger.disabled = disabled


def nibabel_opens(name: str) -> bool:
  """Whether nibabel opens or writes the NIfTI file `name` under that name: its suffix is in one case (of
  .Nii.gz, nibabel lowers it)."""
  return name.endswith((*NIFTI_SUFFIXES, *(suffix.upper() for suffix in NIFTI_SUFFIXES)))


def _nifti(path: pathlib.Path) -> nib.spatialimages.SpatialImage:
  """`nib.load`, and where the suffix misnames the compression (an uncompressed file named .nii.gz, a gzipped
  one named .nii, which ITK reads by their content) or is in mixed case (.Nii.gz, which nibabel lowers, then
  opening another name) the file read by its content, whole."""
  mixed_case = not path.name.endswith(('.hdr', '.HDR', '.img', '.IMG')) and not nibabel_opens(path.name)
  error = 'read by its content: a suffix in mixed case'
  with _nibabel_silent():
    if not mixed_case:
      try:
        nii = nib.load(path)
      except _READ_ERRORS as e:
        error = one_line(e)
      else:
        if isinstance(nii, nib.Nifti1Pair):  # the header as written: nibabel's checks have mended pixdim
          with nib.openers.ImageOpener(nii.file_map.get('header', nii.file_map['image']).filename) as f:
            _warn_of_odd_voxel_sizes(path, type(nii.header).from_fileobj(f, check=False))
        return nii
    try:
      with open(path, 'rb') as f:
        gzipped = f.read(2) == b'\x1f\x8b'
      if path.name.lower().endswith(NIFTI_SUFFIXES) and (
          mixed_case or gzipped != path.name.lower().endswith('.gz')):
        content = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
        nifti2 = int.from_bytes(content[:4], 'little') == 540 or int.from_bytes(content[:4], 'big') == 540
        image_type = nib.Nifti2Image if nifti2 else nib.Nifti1Image
        nii = image_type.from_bytes(content)
        _warn_of_odd_voxel_sizes(path, image_type.header_class.from_fileobj(io.BytesIO(content), check=False))
        return nii
    except _READ_ERRORS as e:  # read by its content and found cut short or corrupt
      error = one_line(e)
  raise DataError(f'{path}: not a readable NIfTI file ({error})') from None


def _warn_of_odd_voxel_sizes(path: pathlib.Path, unchecked_header: nib.Nifti1Header) -> None:
  """nibabel, as ITK, reads a voxel size of 0 in pixdim as 1 mm, silently; without a sform that 1 mm is the
  spacing, so it is said. A negative one nibabel reads as its size, ITK (without a sform it takes) as a flip
  of its axis: the masks, written in nibabel's reading, then lie mirrored on the scan in ITK's tools."""
  zooms = unchecked_header['pixdim'][1:4]
  sizes = ' x '.join(f'{z:g}' for z in zooms)
  if not zooms.all() and unchecked_header['sform_code'] == 0:
    logging.warning('%s: its header gives voxel sizes %s (pixdim) and no sform: 0 is read as 1 mm, as '
                    'nibabel and ITK read it; if the voxels are not 1 mm, sizes and segmentation are wrong '
                    '(convert the scan again, e.g. with dcm2niix)', path, sizes)
  if (zooms < 0).any():
    logging.warning('%s: its header gives negative voxel sizes %s (pixdim), which the NIfTI standard does '
                    'not allow: read as their sizes, as nibabel reads them, while ITK-based viewers (3D '
                    'Slicer, ITK-SNAP) may flip those axes, and the masks written then lie mirrored on the '
                    'scan there (convert the scan again, e.g. with dcm2niix)', path, sizes)


def open_volume(path: str | pathlib.Path) -> nib.Nifti1Image:
  """A NIfTI file's header and a lazy array proxy (a compressed MetaImage or NRRD file is read whole); a
  foreign or headless
  file, or one not 3D, is an error. Trailing axes of length 1 (x, y, z, 1), as some converters write a 3D
  volume, are dropped."""
  path = pathlib.Path(path)
  check_not_broken_link(path)
  if path.name.lower().endswith(METAIMAGE_SUFFIXES):
    nii = _metaimage(path)
  elif path.name.lower().endswith(NRRD_SUFFIXES):
    nii = _nrrd(path)
  else:
    nii = _nifti(path)
  if not isinstance(nii, nib.Nifti1Pair):  # NIfTI-1 and -2, single files and pairs
    raise DataError(f'{path}: an Analyze 7.5 header, without an orientation: convert it to NIfTI'
                    if isinstance(nii, nib.AnalyzeImage) else f'{path}: {type(nii).__name__} is not NIfTI')
  if len(nii.shape) > 3 and all(n == 1 for n in nii.shape[3:]):
    nii = type(nii)(nii.dataobj.reshape(nii.shape[:3]), nii.affine, nii.header)  # still lazy
  if len(nii.shape) > 3 and nii.header.get_intent()[0] in ('vector', 'rgb vector', 'rgba vector'):
    raise DataError(f'{path}: {nii.header.get_intent()[0]} voxels of {np.prod(nii.shape[3:])} components '
                    f'(shape {nii.shape}), expected a greyscale scan or label map: save one component')
  if len(nii.shape) != 3:
    raise DataError(f'{path}: {len(nii.shape)}D volume of shape {nii.shape}, expected 3D' + (
        ' (a series of several volumes, echoes or time points: save the one to use as its own file; a label '
        'map of a channel per class, one-hot: save its argmax, one volume of label values; colour voxels: '
        'save a greyscale volume)' if len(nii.shape) > 3 else ''))
  if min(nii.shape) < 1:
    raise DataError(f'{path}: volume of shape {nii.shape}, an axis without voxels (a corrupt header?)')
  _check_affine(path, nii.affine, mm_per_unit(nii))
  return nii


def _check_affine(path: pathlib.Path, affine: np.ndarray, mm_per_unit: float = 1.0) -> None:
  """A voxel-to-world affine (in a unit of `mm_per_unit` mm) that is not finite, or whose voxels have no
  volume (a spacing or direction of 0), is an error."""
  if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) * mm_per_unit ** 3 < 1e-9:
    unit = {1000.0: 'metres', 0.001: 'microns'}.get(mm_per_unit)
    sizes = ' x '.join(f'{size:.3g}' for size in nib.affines.voxel_sizes(affine) * mm_per_unit)
    raise DataError(f'{path}: degenerate voxel-to-world affine {affine[:3].tolist()}' + (
        f', in {unit} as its header says (voxels of {sizes} mm)' if unit else ''))


def check_headers(case: Case) -> None:
  """Cheap checks from the headers alone: both files readable volumes and 3D, on the same grid (shape, and
  affine within 1e-3 mm, in canonical order)."""
  if case.image is None:
    open_volume(case.label)
    return
  image_nii = open_volume(case.image)
  if case.label is None:
    return
  check_same_grid(image_nii, open_volume(case.label), case)


def canonical_grid(nii: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
  """(shape, affine in mm) of the volume in closest-canonical RAS order (`read_canonical`'s), from the
  header."""
  ornt = nib.io_orientation(nii.affine)
  shape = [0, 0, 0]
  for n, (axis, _) in zip(nii.shape[:3], ornt):
    shape[int(axis)] = n
  to_mm = np.diag([mm_per_unit(nii)] * 3 + [1.0])
  return tuple(shape), to_mm @ nii.affine @ nib.orientations.inv_ornt_aff(ornt, nii.shape[:3])


def check_same_grid(image_nii: nib.Nifti1Image, label_nii: nib.Nifti1Image, case: Case,
                    kinds: tuple[str, str] = ('image', 'label map')) -> None:
  """The label map covers the image's voxels: the same grid in world space, each file in its own voxel order
  (one tool's NIfTI flips or permutes another's: dcm2niix's against ITK's), compared in canonical order.
  `kinds` names the two files in the errors (a label map and its tissue map are checked so too)."""
  (image_shape, image_affine), (label_shape, label_affine) = map(canonical_grid, (image_nii, label_nii))
  # One file without a pose (its first voxel at the origin) beside one with: OAI-ZIB's label maps against
  # images converted from OAI's DICOM. Their voxel orders need not agree, so they are not paired by index.
  unposed = [kind for kind, nii in zip(kinds, (image_nii, label_nii)) if not nii.affine[:3, 3].any()]
  hint = (f"; the {unposed[0]} has no pose (its first voxel at the origin, as OAI-ZIB's segmentation_masks), "
          "the other has: give both in one world grid, as a release of images with labels comes (OAIZIB-CM's "
          'NIfTI)' if len(unposed) == 1 else '')
  if image_shape != label_shape:
    raise DataError(f'{case.id}: {kinds[0]} shape {image_nii.shape} and {kinds[1]} shape {label_nii.shape} '
                    f'differ{hint}')
  if not np.allclose(image_affine, label_affine, atol=_AFFINE_TOL_MM):
    # How far apart the two files put one voxel, at the worst corner: an entry of the affines differing by
    # 0.1 mm (a voxel size) moves the far side of the volume by that times its voxels.
    corners = np.array([[*corner, 1] for corner in itertools.product(*[(0, n - 1) for n in image_shape])])
    apart = np.linalg.norm((corners @ (image_affine - label_affine).T)[:, :3], axis=1).max()
    sizes = [np.linalg.norm(affine[:3, :3], axis=0) for affine in (image_affine, label_affine)]
    voxels = ('' if np.allclose(*sizes, atol=_AFFINE_TOL_MM) else
              f"; voxels of {' x '.join(f'{v:.4g}' for v in sizes[0])} and "
              f"{' x '.join(f'{v:.4g}' for v in sizes[1])} mm")
    # Where no voxel centre moves (the grids differ only along an axis one voxel thick), the entries do.
    differ = (f'grids place a voxel up to {apart:.3g} mm apart (affines differ by more than '
              f'{_AFFINE_TOL_MM} mm)' if apart > _AFFINE_TOL_MM else
              f'affines differ by {np.abs(image_affine - label_affine).max():.3g} (more than '
              f'{_AFFINE_TOL_MM})')
    raise DataError(f'{case.id}: {kinds[0]} and {kinds[1]} {differ}{voxels}: {case.image} vs {case.label}'
                    f'{hint}')


Spacing = tuple[float, float, float]


def mm_per_unit(nii: nib.Nifti1Image) -> float:
  """Millimetres per unit of the affine: 1000 and 0.001 where a NIfTI header's spatial unit is the metre or
  the micron (as ITK, and so SimpleITK-based tools, read it), else 1 (mm, or unknown, taken as mm)."""
  # The code itself: nibabel's get_xyzt_units raises on a time code outside the standard's.
  return _MM_PER_UNIT.get(int(nii.header['xyzt_units']) % 8, 1.0)


def read_canonical(nii: nib.Nifti1Image, path: str | pathlib.Path) -> tuple[np.ndarray, Spacing]:
  """The voxels in closest-canonical RAS order and the spacing in that order in mm, the lengths of the
  affine's columns (the geometry nibabel reads, the sform where there is one: a NIfTI file's pixdim may
  disagree with it) in the header's unit (`mm_per_unit`); reading is where a truncated file fails."""
  try:
    canonical = nib.as_closest_canonical(nii)
    array = np.asarray(canonical.dataobj)
  except _READ_ERRORS as e:
    raise DataError(f'{path}: voxel data unreadable, truncated or corrupt ({one_line(e)})') from None
  except MemoryError:
    gigabytes = np.prod(nii.shape, dtype=float) * nii.get_data_dtype().itemsize / 2 ** 30
    raise DataError(f'{path}: its header gives a shape of {nii.shape}, {gigabytes:.3g} GiB of voxels, more '
                    'than memory holds (a corrupt header?)') from None
  return array, tuple(float(s) * mm_per_unit(nii) for s in nib.affines.voxel_sizes(canonical.affine))


def load_image(path: str | pathlib.Path) -> tuple[np.ndarray, Spacing]:
  """Image (float32) in closest-canonical RAS order, and the voxel spacing in mm; an image that is constant,
  holds NaN or infinite values, or whose values float32 cannot hold apart is an error (`canonical_image`).

  Axis 0 is then left-right (the sagittal axis): a sagittal slice is array[i], an (anterior, superior) plane.
  """
  path = pathlib.Path(path)
  return canonical_image(open_volume(path), path)


def canonical_image(nii: nib.Nifti1Image, source: str | pathlib.Path) -> tuple[np.ndarray, Spacing]:
  """`load_image` of an image already open (a NIfTI file's, or a DICOM series' read into NIfTI); `source`
  names it in errors. Complex voxels (a reconstruction's raw output) become their magnitude, the image a
  scanner shows."""
  image, spacing = read_canonical(nii, source)
  if image.dtype.names:
    raise DataError(f'{source}: {"/".join(image.dtype.names)} colour voxels, expected a greyscale scan')
  image = np.abs(image) if np.iscomplexobj(image) else image
  if not np.isfinite(image).all():
    raise DataError(f'{source}: image holds {np.count_nonzero(~np.isfinite(image))} NaN or infinite voxels; '
                    'replace them (e.g. by 0) and run again')
  if (peak := np.abs(image).max()) > np.finfo(np.float32).max:  # float64 voxels that float32 cannot hold
    raise DataError(f'{source}: image values reach {peak:.3g}, beyond float32 (3.4e38); rescale the scan')
  if image.min() == image.max():
    raise DataError(f'{source}: image is constant ({image.flat[0]}), nothing to segment')
  if peak < np.finfo(np.float32).tiny:  # float32 would hold them as zeros or imprecise subnormals
    raise DataError(f'{source}: image values reach only {peak:.3g}, below float32\'s normal numbers (from '
                    '1.2e-38); rescale the scan')
  image32 = image.astype(np.float32, copy=False)
  if image32.min() == image32.max():  # values float32 rounds together: integers from 2**24 a unit apart
    raise DataError(f'{source}: image values span {image.min():.9g} to {image.max():.9g}, which float32 '
                    'rounds to one value; rescale the scan')
  return image32, spacing


def _check_label_values(labels: np.ndarray, case: Case, label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """Integer labels whose values are all background, a bone label or a key of label_map."""
  if labels.dtype.names or np.iscomplexobj(labels):
    kind = f'{"/".join(labels.dtype.names)} colour' if labels.dtype.names else 'complex'
    raise DataError(f'{case.id}: label file {case.label} holds {kind} voxels (expected integers)')
  if not np.issubdtype(labels.dtype, np.integer):
    if not np.isfinite(labels).all():
      raise DataError(f'{case.id}: label file {case.label} holds NaN or infinite values (expected integers)')
    if not np.array_equal(labels, np.round(labels)):
      raise DataError(f'{case.id}: label file {case.label} holds non-integer values (expected integers)')
    if abs(extreme := labels.flat[np.abs(labels).argmax()]) >= 2 ** 31:  # beyond int64 the cast would wrap
      raise DataError(f'{case.id}: label file {case.label} holds values as far as {extreme:.3g} (expected '
                      'label values, integers 0-255)')
    labels = labels.astype(np.int64)
  known = {0, *BONE_LABELS, *(int(source) for source, _ in label_map)}
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi > 255:
    outside = sorted({lo, hi} - known)
  else:  # a lookup, not a histogram: np.bincount's int64 copy of 23 M voxels costs seconds here
    unknown = np.ones(256, bool)
    unknown[[v for v in known if 0 <= v < 256]] = False
    outside = np.unique(labels[unknown[labels]]).tolist()
  if outside:
    # data.label_map's sources are 0-255 (uint8 stores): a value outside is the label file's to change.
    fix = ("add each to data.label_map with its class, 0 (background), 1 (femoral) or 2 (tibial cartilage), "
           "as the data set names it: OAIZIB-CM's lateral tibial cartilage 5 as "
           "data.label_map='((2, 1), (4, 2), (5, 2))', a meniscus or patellar cartilage as class 0"
           if lo >= 0 and hi <= 255 else
           'data.label_map maps values 0-255: rewrite the file with its labels in that range')
    raise DataError(f'{case.id}: label file {case.label} holds values {outside[:8]} outside data.label_map '
                    f'(known: {sorted(known)}; {fix})')
  if hi <= 2 and lo >= 0:  # only 0, 1, 2: this tool's own mask values (FC 1, TC 2), or the label map's?
    present = np.zeros(3, bool)
    present[labels.ravel()] = True
    if present[1] and present[2] and 2 not in [int(target) for source, target in label_map
                                               if int(source) < 3 and present[int(source)]]:
      logging.warning('%s: label file %s holds only the values 0, 1 and 2, and data.label_map %s reads none '
                      "as TC: a mask in this tool's own values (FC 1, TC 2)? Then read it with "
                      "data.label_map='((1, 1), (2, 2))' (predict with the shipped model: %s "
                      '--config.data.label_map=...); an OAI-ZIB label map without tibia (femur 1, FC 2) is '
                      'read right as it is', case.id, case.label, tuple(map(tuple, label_map)),
                      eas.SHIPPED_FLAGS)
  return labels


def load_labels(case: Case, label_map: Sequence[Sequence[int]]) -> tuple[np.ndarray, Spacing]:
  """The case's source labels (integers of known values) in closest-canonical RAS order, and the spacing."""
  if case.label is None:
    raise DataError(f'{case.id}: no label file')
  check_headers(case)
  labels, spacing = read_canonical(open_volume(case.label), case.label)
  return _check_label_values(labels, case, label_map), spacing


# An MR image has hundreds of grey levels; a scan with fewer distinct values is likely a label map or mask.
_MIN_GREY_LEVELS = 16


def few_grey_levels(image: np.ndarray) -> np.ndarray | None:
  """The distinct values of an image that has fewer than _MIN_GREY_LEVELS (a label map or mask given in
  place of a scan), else None."""
  # Every third voxel along each axis first: an MR image has hundreds of grey levels there, so np.unique of
  # the whole volume (seconds) runs only for what may be a label map or mask.
  if len(np.unique(image[::3, ::3, ::3])) < _MIN_GREY_LEVELS and (
      len(levels := np.unique(image)) < _MIN_GREY_LEVELS):
    return levels
  return None


def load_case(case: Case, label_map: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, Spacing]:
  """Image (float32) and remapped labels (uint8) in closest-canonical RAS order, and the voxel spacing in mm.

  Every check of check_headers and load_image applies, and the labels must be integers of known values.
  """
  labels, _ = load_labels(case, label_map)
  if case.image is None:
    raise DataError(f'{case.id}: no image file (a label map alone trains only with data.synth=True)')
  image, spacing = load_image(case.image)
  if (levels := few_grey_levels(image)) is not None:
    logging.warning('%s: image %s holds only %d distinct values (%s): a label map or mask in place of the '
                    'scan? It trains as given', case.id, case.image, len(levels),
                    ', '.join(f'{v:g}' for v in levels))
  return image, remap_labels(labels, label_map), spacing


def labels_on_grid(nii: nib.Nifti1Image, case: Case, label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """The training classes (uint8) of `case.label`, the label map of a volume open as `nii` (`case.image`'s, or
  a mask written in its grid), in closest-canonical RAS order as `canonical_image` gives the volume; the
  label map must lie on the volume's grid (in any voxel order) and hold known values."""
  label_nii = open_volume(case.label)
  check_same_grid(nii, label_nii, case)
  labels, _ = read_canonical(label_nii, case.label)
  classes = remap_labels(_check_label_values(labels, case, label_map), label_map)
  check_has_cartilage(classes, case.label, label_map)
  return classes


def check_has_cartilage(classes: np.ndarray, label: pathlib.Path, label_map: Sequence[Sequence[int]]) -> None:
  """Training classes (`remap_labels`') of a `label` file without any cartilage are an error: a wrong
  data.label_map (binary masks, another numbering), or an unlabelled knee."""
  if not classes.any():
    cartilage_values = sorted(int(source) for source, target in label_map if target)
    raise DataError(f'{label.name} holds none of the values data.label_map makes cartilage '
                    f'({", ".join(map(str, cartilage_values))}): check data.label_map')


def remap_labels(labels: np.ndarray, label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """Maps source labels to training classes through a lookup table; labels not in label_map become 0."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise DataError(f'labels must lie in 0..255, found {labels.min()}..{labels.max()}')
  table = np.zeros(256, np.uint8)
  for source, target in label_map:
    table[int(source)] = int(target)
  return table[labels.astype(np.intp, copy=False)]


def save_volume(path: str | pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
  """Writes array as NIfTI with the given voxel-to-world (RAS mm) affine; a crash leaves no half file."""
  nii = nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64))
  nii.set_qform(affine, code=1)
  nii.set_sform(affine, code=1)
  write_nifti(nii, path)


def write_nifti(nii: nib.Nifti1Image, path: str | pathlib.Path) -> None:
  """`nib.save` through `atomic.replaced`: a crash or a stop leaves the earlier file or none, never half a
  file. Makes the folder."""
  with atomic.replaced(path) as tmp:
    nib.save(nii, tmp)
