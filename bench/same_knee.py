"""One knee stored in other ways, segmented by `predict.predict`: do its measures stay the same?

python bench/same_knee.py --scan knee.nii.gz [--weights easunet_jax/weights/eas_knee.npz]
                          [--margins_mm 30,10] [--out DIR]

A study that follows knees over visits compares measures of scans that hold the same anatomy but were
stored, placed and cropped otherwise. This writes copies of `--scan`: its voxel axes permuted and
flipped (the affine saying so), its origin moved, its world mirrored (the same voxels as a left knee of
a right one), its in-plane pixels resampled to 0.5 mm, its field of view 2 mm shorter at one in-plane
edge (the network's pixel grid shifted against the anatomy), and cropped to the cartilage (the scan's
own mask's) with each of `--margins_mm` to spare; segments each as `--mode=predict` does, and prints a
Markdown table of each copy's plate volumes and mean thickness, and the 3D Dice of its mask, taken back
to the scan's grid, against the scan's own mask.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from easunet_jax import metrics, predict, pretrained, reports  # noqa: E402
from easunet_jax.data import volumes  # noqa: E402
from easunet_jax.errors import run_cli  # noqa: E402

IN_PLANE_MM = 0.5  # the resampled copy's pixels
MOVED_MM = (0.0, -40.0, 30.0)  # the moved copy's origin shift (RAS): the knee's side stays
EDGE_MM = 2.0  # the field of view shortened by this at one edge


def _stored_otherwise(data: np.ndarray, affine: np.ndarray, order: Sequence[int], flips: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """`data` with its axes in `order`, then flipped along `flips`, and the affine of the same world."""
  moved = data.transpose(order)
  index = np.eye(4)[:, [*order, 3]]  # the scan's voxel index of the transposed array's
  for axis in flips:
    moved = np.flip(moved, axis)
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1, moved.shape[axis] - 1
    index = index @ flip
  return np.ascontiguousarray(moved), affine @ index


def _in_plane_axes(affine: np.ndarray) -> list[int]:
  """The voxel axes of a sagittal slice: all but the left-right one."""
  return [axis for axis, code in enumerate(nib.aff2axcodes(affine)) if code not in 'LR']


def _resampled_in_plane(data: np.ndarray, affine: np.ndarray, pixel_mm: float
                        ) -> tuple[np.ndarray, np.ndarray]:
  """`data` resampled (linear) to `pixel_mm` along the in-plane axes, the field of view's edges kept."""
  spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
  zoom = [s / pixel_mm if axis in _in_plane_axes(affine) else 1.0 for axis, s in enumerate(spacing)]
  resampled = ndimage.zoom(data.astype(np.float32), zoom, order=1, grid_mode=True, mode='grid-constant')
  ratio = np.array(data.shape) / resampled.shape  # the scan's voxels per resampled voxel
  index = np.diag([*ratio, 1.0])
  index[:3, 3] = (ratio - 1) / 2  # the first resampled voxel's centre in the scan's voxel index
  return resampled, affine @ index


def _cropped(data: np.ndarray, affine: np.ndarray, start: Sequence[int], stop: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
  """`data` cropped to voxels `start` to `stop`, and the affine of the same world."""
  index = np.eye(4)
  index[:3, 3] = start
  return np.ascontiguousarray(data[tuple(map(slice, start, stop))]), affine @ index


def _on_scan_grid(mask: nib.Nifti1Image, scan: nib.Nifti1Image, world: np.ndarray) -> np.ndarray:
  """A copy's `mask` sampled (nearest) at the scan's voxels, whose world the copy's is `world` @ (outside
  the copy: background)."""
  grid = np.indices(scan.shape).reshape(3, -1)
  to_copy = np.linalg.inv(mask.affine) @ world @ scan.affine
  where = to_copy[:3, :3] @ grid + to_copy[:3, 3:]
  return ndimage.map_coordinates(np.asarray(mask.dataobj), where, order=0, cval=0).reshape(scan.shape)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scan', required=True, help='a knee volume (NIfTI, MetaImage, NRRD)')
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--margins_mm', default='30,10', help="the cropped copies' margins around the "
                      'cartilage, comma-separated')
  parser.add_argument('--out', default='', help='where the copies and masks go (default: a temp dir)')
  args = parser.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='same_knee_'))
  scan = volumes.open_volume(args.scan)
  data, affine = np.asarray(scan.dataobj), scan.affine
  config = pretrained.config_of(args.weights)
  (out / 'scan').mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), out / 'scan' / 'as_stored.nii.gz')
  [own] = predict.predict(config, None, out / 'scan', out / 'masks', args.weights)
  own_mask = np.asarray(nib.load(own['output']).dataobj)
  moved, mirrored = np.eye(4), np.diag([-1.0, 1.0, 1.0, 1.0])
  moved[:3, 3] = MOVED_MM
  spacing = np.array(scan.header.get_zooms()[:3])
  edge = np.zeros(3, int)
  edge[_in_plane_axes(affine)[0]] = np.ceil(EDGE_MM / spacing[_in_plane_axes(affine)[0]])
  cartilage = np.argwhere(own_mask > 0)
  crops = {margin: (np.maximum(cartilage.min(0) - np.ceil(margin / spacing).astype(int), 0),
                    np.minimum(cartilage.max(0) + 1 + np.ceil(margin / spacing).astype(int), data.shape))
           for margin in map(float, args.margins_mm.split(','))}
  copies = {  # name: (data, affine, the copy's world of the scan's)
      'axes permuted and flipped': (*_stored_otherwise(data, affine, (2, 0, 1), (0, 2)), np.eye(4)),
      f'origin moved by {np.linalg.norm(MOVED_MM):.0f} mm': (data, moved @ affine, moved),
      'mirrored (a left knee)': (data, mirrored @ affine, mirrored),
      f'in-plane pixels resampled to {IN_PLANE_MM:g} mm': (*_resampled_in_plane(data, affine, IN_PLANE_MM),
                                                           np.eye(4)),
      f'field of view {EDGE_MM:g} mm shorter at one edge': (*_cropped(data, affine, edge, data.shape),
                                                              np.eye(4)),
      **{f'cropped to the cartilage, {margin:g} mm to spare': (*_cropped(data, affine, *box), np.eye(4))
         for margin, box in crops.items()},
  }
  (out / 'copies').mkdir(exist_ok=True)
  files = {}
  for k, (name, (copy, copy_affine, _)) in enumerate(copies.items()):
    files[name] = out / 'copies' / f'copy_{k}.nii.gz'
    nib.save(nib.Nifti1Image(copy, copy_affine), files[name])
  results = {pathlib.Path(r['input']).name: r for r in predict.predict(config, None, out / 'copies',
                                                                       out / 'masks', args.weights)}
  print(f'{args.scan} segmented by {args.weights}, stored in other ways (`bench/same_knee.py`); 3D Dice (%) '
        'of each mask, taken back to the scan\'s grid, against the scan\'s own:\n')
  print('| copy | side | FC mm^3 | FC mean thickness mm | TC mm^3 | TC mean thickness mm | Dice FC | Dice TC '
        '|')
  print('|---|---|---|---|---|---|---|---|')
  rows = {'as stored': (own, own_mask)}
  for name, (_, _, world) in copies.items():
    result = results[files[name].name]
    rows[name] = (result, _on_scan_grid(nib.load(result['output']), scan, world))
  for name, (result, mask) in rows.items():
    fc, tc = result['regions']['fc'], result['regions']['tc']
    dice = [metrics.segmentation_metrics(mask == k, own_mask == k, spacing)['dice'] for k in (1, 2)]
    side = reports.SIDES.get(result['laterality'], 'unknown')
    print(f"| {name} | {side} | {fc['volume_mm3']:.0f} | {fc['thickness_mean_mm']:.2f} | "
          f"{tc['volume_mm3']:.0f} | {tc['thickness_mean_mm']:.2f} | {dice[0]:.1f} | {dice[1]:.1f} |")


if __name__ == '__main__':
  run_cli(main)
