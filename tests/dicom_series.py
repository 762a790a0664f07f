"""DICOM series written for the tests (tests/test_dicom.py, tests/test_predict.py): MR slices of a given
geometry under random file names, so that directory order differs from slice order."""

import uuid

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

SAGITTAL = ((0, 1, 0), (0, 0, -1))  # knee DESS: rows run anterior-posterior, columns head to foot
AXIAL = ((1, 0, 0), (0, 1, 0))
CORONAL = ((1, 0, 0), (0, 0, -1))
_A, _B = np.deg2rad(15), np.deg2rad(10)
_TILT = (np.array([[np.cos(_A), -np.sin(_A), 0], [np.sin(_A), np.cos(_A), 0], [0, 0, 1]]) @
         np.array([[1, 0, 0], [0, np.cos(_B), -np.sin(_B)], [0, np.sin(_B), np.cos(_B)]]))
OBLIQUE = (_TILT @ SAGITTAL[0], _TILT @ SAGITTAL[1])
STEPS = np.arange(8) * 0.7


def ds_numbers(values):
  return [f'{float(v):.10g}' for v in values]  # DS strings within the standard's 16 characters


def write_series(folder, cosines=SAGITTAL, origin=(60.0, -20.0, 30.0), spacing=(0.5, 0.4), offsets=STEPS,
                 size=(24, 20), slope=1.0, intercept=0.0, laterality=None, uid=None, edit=None, seed=0,
                 voxels=None):
  """Writes slices of size (columns, rows), slice n at origin + offsets[n] * normal, under random file names;
  returns the stored values as (column, row, slice), and the series uid. `voxels` (uint16, (columns, rows,
  slices)) sets the values and the size, else they are random."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  if voxels is None:
    voxels = rng.integers(0, 4000, size=(*size, len(offsets)), dtype=np.uint16)
  size = voxels.shape[:2]
  uid, study = uid or generate_uid(), generate_uid()
  normal = np.cross(*cosines)
  for n, offset in enumerate(offsets):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.Manufacturer, ds.SeriesDescription = 'MR', 'ACME', f'DESS {len(offsets)}'
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = study, uid, 3, n + 1
    ds.ImageOrientationPatient = ds_numbers([*cosines[0], *cosines[1]])
    ds.ImagePositionPatient = ds_numbers(np.asarray(origin) + offset * normal)
    ds.PixelSpacing = ds_numbers(spacing)
    ds.RescaleSlope, ds.RescaleIntercept = ds_numbers([slope, intercept])
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size[1], size[0], 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(voxels[:, :, n].T).tobytes()  # row by row
    if laterality:
      ds.Laterality = laterality
    if edit:
      edit(n, ds)
    ds.save_as(folder / f'IM{uuid.uuid4().hex[:10]}', enforce_file_format=True)
  return voxels, uid
