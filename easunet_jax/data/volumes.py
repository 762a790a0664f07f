"""NIfTI volumes: discovery of image/label pairs, loading in canonical RAS order, label remapping, saving."""

import logging
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import nibabel as nib
import numpy as np

_AFFINE_TOL_MM = 1e-3  # image and label affines may differ by rounding only


class DataError(ValueError):
  """A user-facing data problem (missing, unreadable or inconsistent files); its message is one line."""


class Case(NamedTuple):
  id: str
  image: pathlib.Path
  label: pathlib.Path


def _strip_nii(name: str) -> str:
  for suffix in ('.nii.gz', '.nii'):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return ''


def discover_cases(root: str | pathlib.Path) -> list[Case]:
  """Image/label pairs under root (images/+labels/ or nnU-Net imagesTr/+labelsTr/), sorted by id."""
  root = pathlib.Path(root)
  if (root / 'imagesTr').is_dir():
    image_dir, label_dir, image_suffix = root / 'imagesTr', root / 'labelsTr', '_0000'
  else:
    image_dir, label_dir, image_suffix = root / 'images', root / 'labels', ''
  if not image_dir.is_dir():
    raise DataError(f'{root}: expected images/ + labels/ or imagesTr/ + labelsTr/ with .nii.gz volumes')
  cases = []
  for image in sorted(image_dir.iterdir()):
    stem = _strip_nii(image.name)
    if not stem or not stem.endswith(image_suffix):
      continue
    case_id = stem[:len(stem) - len(image_suffix)]
    label = next((p for p in (label_dir / f'{case_id}.nii.gz', label_dir / f'{case_id}.nii') if p.exists()), None)
    if label is None:
      logging.warning('%s: no label %s/%s.nii.gz, case skipped', image, label_dir, case_id)
      continue
    cases.append(Case(case_id, image, label))
  if not cases:
    raise DataError(f'{image_dir}: no image with a matching label found (expected <id>{image_suffix}.nii.gz)')
  return sorted(cases, key=lambda c: c.id)


def remap_labels(labels: np.ndarray, label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """Maps source labels to training classes through a lookup table; labels not in label_map become 0."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise DataError(f'labels must lie in 0..255, found {labels.min()}..{labels.max()}')
  table = np.zeros(256, np.uint8)
  for source, target in label_map:
    table[int(source)] = int(target)
  return table[labels.astype(np.intp, copy=False)]


def load_case(case: Case, label_map: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
  """Image (float32) and remapped labels (uint8) in closest-canonical RAS order, and the voxel spacing in mm.

  Axis 0 is then left-right (the sagittal axis): a sagittal slice is array[i], an (anterior, superior) plane.
  """
  try:
    image_nii = nib.as_closest_canonical(nib.load(case.image))
    label_nii = nib.as_closest_canonical(nib.load(case.label))
  except (OSError, nib.filebasedimages.ImageFileError) as e:
    raise DataError(f'{case.id}: cannot read {case.image} / {case.label}: {e}') from None
  if image_nii.ndim != 3 or image_nii.shape != label_nii.shape:
    raise DataError(f'{case.id}: image shape {image_nii.shape} and label shape {label_nii.shape} differ '
                    '(expected the same 3D shape)')
  if not np.allclose(image_nii.affine, label_nii.affine, atol=_AFFINE_TOL_MM):
    raise DataError(f'{case.id}: image and label affines differ by more than {_AFFINE_TOL_MM} mm '
                    f'({case.image.name} vs {case.label.name})')
  raw = np.asarray(label_nii.dataobj)
  if not np.issubdtype(raw.dtype, np.integer):
    if not np.array_equal(raw, np.round(raw)):
      raise DataError(f'{case.id}: label file {case.label} holds non-integer values (expected integer labels)')
    raw = raw.astype(np.int64)
  image = np.asarray(image_nii.dataobj, dtype=np.float32)
  spacing = tuple(float(s) for s in image_nii.header.get_zooms()[:3])
  return image, remap_labels(raw, label_map), spacing


def save_volume(path: str | pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
  """Writes array as a NIfTI file with the given voxel-to-world (RAS mm) affine."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nii = nib.Nifti1Image(np.asarray(array), np.asarray(affine, np.float64))
  nii.set_qform(affine, code=1)
  nii.set_sform(affine, code=1)
  nib.save(nii, path)
