"""Predict's orientation check on one labelled knee scan posed as headers and scanners may pose it.

python bench/pose.py --scan knee_000.nii.gz --labels knee_000_labels.nii.gz [--weights FILE] [--out DIR]
                     [--degrees 20,30]

The scan's voxels in each of the eight in-plane orientations (`pose.orient`) under the scan's own header,
as a header that flips or swaps the knee's in-plane axes gives them to the network (square in-plane pixels
keep the header's voxel size right), stored in the two other cyclic axis orders under a header that takes
the stored axes for its own (the voxel sizes following the voxels), as a header that names another axis
left-right gives them, and rotated in the sagittal plane by each of `--degrees` both ways
(`pose.rotate_slices`: a knee scanned more flexed or tilted than the model learnt); the labels posed
alike (rotated through their one-hot maps and the argmax). Every pose is segmented by `predict.predict` with
the model's settings, as `--mode=predict --labels` does, once with `predict.orientation_check` and once
without. Prints a Markdown table (the pose, what the check decided, 3D Dice % FC / TC with the check and
without) and one JSON line.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import transfer  # noqa: E402

from easunet_jax import pose, predict, pretrained  # noqa: E402
from easunet_jax.data import volumes  # noqa: E402
from easunet_jax.errors import run_cli  # noqa: E402


def write_poses(scan: pathlib.Path, labels: pathlib.Path, out: pathlib.Path,
                degrees: tuple[float, ...]) -> dict[str, str]:
  """Writes out/images/<pose>.nii.gz and out/labels/<pose>.nii.gz in the scan's canonical grid; returns
  {pose file stem: description}."""
  transfer.check_made_with(out, {'scan': str(scan.resolve()), 'labels': str(labels.resolve())})
  nii = nib.as_closest_canonical(volumes.open_volume(scan))
  image, spacing = volumes.canonical_image(nii, scan)
  truth, _ = volumes.read_canonical(volumes.open_volume(labels), labels)
  values = np.unique(truth)
  poses = {}
  orientations = list(itertools.product(range(3), *[(False, True)] * 3))
  probe = np.arange(24).reshape(2, 3, 4)

  def undoing(posed_probe: np.ndarray) -> str:
    """The turn of a header that turns a posed knee: the orientation that undoes the pose, which the check
    should find, in words."""
    undo = next(o for o in orientations if np.array_equal(pose.orient(posed_probe, o), probe))
    return f'turned: {pose.describe_orientation(undo)}'

  for orientation in orientations[:8]:  # left-right kept
    name = '_'.join(['turned'] + [part for part, on in zip(('swapped', 'ap', 'si'), orientation[1:]) if on]
                    if any(orientation) else ['as_scanned'])
    poses[name] = (pose.orient(image, orientation), pose.orient(truth, orientation), nii.affine,
                   undoing(pose.orient(probe, orientation)) if any(orientation) else 'as scanned')
  for axes in ((1, 2, 0), (2, 0, 1)):
    affine = nii.affine.copy()
    affine[:3, :3] = nii.affine[:3, :3] / np.asarray(spacing) * np.asarray(spacing)[list(axes)]
    poses['stored_' + '_'.join(('lr', 'ap', 'si')[a] for a in axes)] = (
        image.transpose(axes), truth.transpose(axes), affine, undoing(probe.transpose(axes)))
  for angle in (a for d in degrees for a in (d, -d)):
    one_hot = np.stack([(truth == v).astype(np.float32) for v in values], -1)
    rotated = values[np.argmax(pose.rotate_slices(one_hot, angle, spacing), -1)]
    poses[f'rotated_{angle:+g}'] = (pose.rotate_slices(image, angle, spacing), rotated, nii.affine,
                                    f'rotated {angle:+g} degrees in the sagittal plane')
  for name, (voxels, label_voxels, affine, _) in poses.items():
    if (out / 'images' / f'{name}.nii.gz').exists():  # a pose already there is kept, and with it its masks
      continue
    for kind, array in (('labels', label_voxels.astype(np.uint8)), ('images', voxels)):  # the image last
      (out / kind).mkdir(parents=True, exist_ok=True)
      nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), out / kind / f'{name}.nii.gz')
  return {name: text for name, (_, _, _, text) in poses.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scan', required=True, help='a knee scan (NIfTI, MetaImage or NRRD)')
  parser.add_argument('--labels', required=True, help='its label map (OAI-ZIB values: FC 2, TC 4)')
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--out', default='', help='where the poses and masks go (default: a temp dir); poses '
                      'already there are reused, and masks the same model and settings made')
  parser.add_argument('--degrees', default='20,30', help='sagittal rotations, each both ways')
  args = parser.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='pose_'))
  poses = write_poses(pathlib.Path(args.scan), pathlib.Path(args.labels), out,
                      tuple(float(d) for d in args.degrees.split(',')))
  config = pretrained.config_of(args.weights)
  runs = {}
  for check in (True, False):
    config.predict.orientation_check = check
    runs[check] = {pathlib.Path(r['input']).name.removesuffix('.nii.gz'): r for r in predict.predict(
        config, None, out / 'images', out / ('masks_checked' if check else 'masks_as_given'), args.weights,
        continue_prediction=True, labels=out / 'labels')}
  print(f'Model {args.weights}, {args.scan} posed; 3D Dice % FC / TC:\n')
  print('| pose | the check decided | with the check | without |')
  print('|---|---|---|---|')
  summary = {}
  for name, text in poses.items():
    checked = runs[True][name]
    decided = []
    if checked['orientation'] != 'as the header':
      decided.append(f"turned back ({checked['orientation']})")
    if checked['rotation_deg']:
      decided.append(f"rotated by {checked['rotation_deg']:+g} degrees")
    dice = {check: [runs[check][name]['scores'][plate]['dice'] for plate in ('fc', 'tc')] for check in runs}
    print(f"| {text} | {'; '.join(decided) or 'nothing'} | "
          + ' | '.join(' / '.join(f'{d:.1f}' for d in dice[check]) for check in (True, False)) + ' |')
    summary[name] = {'decided': decided, 'dice_with_check': dice[True], 'dice_without': dice[False]}
  print(json.dumps({'weights': args.weights, 'scan': args.scan, 'out': str(out), 'poses': summary}))


if __name__ == '__main__':
  run_cli(main)
