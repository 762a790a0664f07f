"""DICOM series written for the tests (tests/test_dicom.py, tests/test_predict.py): MR slices of a given
geometry under random file names, so that directory order differs from slice order, or the same slices as
the frames of one enhanced (multi-frame) MR file in shuffled order."""

import uuid

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

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


def _image(sop_class, uid, study, size, description):
  """A grayscale 16-bit MR image header of `size` (columns, rows) in series `uid`."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
  ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds.Modality, ds.Manufacturer, ds.SeriesDescription = 'MR', 'ACME', description
  ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, uid, 3
  ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = size[1], size[0], 1, 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  return ds


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
  uid, study = uid or generate_uid(), generate_uid()
  normal = np.cross(*cosines)
  for n, offset in enumerate(offsets):
    ds = _image(MRImageStorage, uid, study, voxels.shape[:2], f'DESS {len(offsets)}')
    ds.InstanceNumber = n + 1
    ds.ImageOrientationPatient = ds_numbers([*cosines[0], *cosines[1]])
    ds.ImagePositionPatient = ds_numbers(np.asarray(origin) + offset * normal)
    ds.PixelSpacing = ds_numbers(spacing)
    ds.RescaleSlope, ds.RescaleIntercept = ds_numbers([slope, intercept])
    ds.PixelData = np.ascontiguousarray(voxels[:, :, n].T).tobytes()  # row by row
    if laterality:
      ds.Laterality = laterality
    if edit:
      edit(n, ds)
    ds.save_as(folder / f'IM{uuid.uuid4().hex[:10]}', enforce_file_format=True)
  return voxels, uid


def _item(**tags):
  item = Dataset()
  for keyword, value in tags.items():
    setattr(item, keyword, value)
  return Sequence([item])


def write_enhanced(path, echoes, cosines=SAGITTAL, origin=(60.0, -20.0, 30.0), spacing=(0.5, 0.4),
                   offsets=STEPS, slope=1.0, intercept=0.0, laterality=None, uid=None, phase=False, edit=None,
                   seed=0):
  """Writes one enhanced MR file whose frames are the slices (slice n at origin + offsets[n] * normal) of each
  volume of `echoes` (uint16, (columns, rows, slices); echo e at EffectiveEchoTime 5 (e + 1) ms), in shuffled
  order: position, echo time and, with `phase`, ComplexImageComponent per frame (each slice also as a
  random phase frame), orientation, pixel spacing, rescaling and laterality shared. `edit(echo, n, groups)`
  may change a frame's per-frame functional groups. Returns the series uid."""
  rng = np.random.default_rng(seed)
  uid = uid or generate_uid()
  normal = np.cross(*cosines)
  ds = _image(EnhancedMRImageStorage, uid, generate_uid(), echoes[0].shape[:2], 'DESS enhanced')
  shared = Dataset()
  shared.PlaneOrientationSequence = _item(ImageOrientationPatient=ds_numbers([*cosines[0], *cosines[1]]))
  shared.PixelMeasuresSequence = _item(PixelSpacing=ds_numbers(spacing), SliceThickness='0.7')
  shared.PixelValueTransformationSequence = _item(RescaleSlope=ds_numbers([slope])[0],
                                                  RescaleIntercept=ds_numbers([intercept])[0])
  if laterality:
    shared.FrameAnatomySequence = _item(FrameLaterality=laterality)
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  # Frames indexed (stack, position in stack, echo), as scanners write them and as dcm2niix sorts them.
  ds.DimensionIndexSequence = Sequence([Dataset() for _ in range(3)])
  pointers = (('StackID', 'FrameContentSequence'), ('InStackPositionNumber', 'FrameContentSequence'),
              ('EffectiveEchoTime', 'MREchoSequence'))
  for item, (keyword, group) in zip(ds.DimensionIndexSequence, pointers):
    item.DimensionIndexPointer = tag_for_keyword(keyword)
    item.FunctionalGroupPointer = tag_for_keyword(group)
  frames = [(e, n, component) for e in range(len(echoes)) for n in range(len(offsets))
            for component in ('MAGNITUDE', 'PHASE')[:1 + phase]]
  per_frame, pixels = [], []
  for index in rng.permutation(len(frames)):
    e, n, component = frames[index]
    groups = Dataset()
    position = np.asarray(origin) + offsets[n] * normal
    groups.PlanePositionSequence = _item(ImagePositionPatient=ds_numbers(position))
    groups.FrameContentSequence = _item(StackID='1', InStackPositionNumber=n + 1,
                                        DimensionIndexValues=[1, n + 1, e + 1])
    groups.MREchoSequence = _item(EffectiveEchoTime=5.0 * (e + 1))
    groups.MRImageFrameTypeSequence = _item(ComplexImageComponent=component)
    if edit:
      edit(e, n, groups)
    per_frame.append(groups)
    stored = echoes[e][:, :, n] if component == 'MAGNITUDE' else rng.integers(0, 4000, echoes[e].shape[:2])
    pixels.append(np.ascontiguousarray(stored.T.astype(np.uint16)))
  ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
  ds.NumberOfFrames = len(per_frame)
  ds.PixelData = np.stack(pixels).tobytes()
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)
  return uid
