"""MetaImage and NRRD files written by ITK itself (SimpleITK, a reference reader and writer of both formats)
for tests/test_volumes.py, tests/test_synth.py and tests/test_predict.py."""

import pathlib

import numpy as np
import SimpleITK as sitk


def write(path: pathlib.Path, voxels: np.ndarray, affine: np.ndarray | None = None,
          spacing=(1.0, 1.0, 1.0)) -> None:
  """`voxels` indexed (x, y, z) into `path` (.mhd, .nhdr: a header beside a .raw file; .mha, .nrrd: one
  compressed file) at the pose of the RAS voxel-to-world `affine`; without one, as OAI-ZIB's segmentations
  come: no pose (ITK's identity in LPS, origin 0) and only `spacing`."""
  image = sitk.GetImageFromArray(np.asarray(voxels).T)  # SimpleITK's arrays are indexed (z, y, x)
  if affine is None:
    image.SetSpacing(tuple(map(float, spacing)))
  else:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
  path.parent.mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(image, str(path), useCompression=path.suffix in ('.mha', '.nrrd'))
