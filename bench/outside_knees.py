"""Transfer check on knees an outside tester would draw: a second tissue model and renderer, written apart
from the phantom's (`data/knee.py`, `phantom.render`) and without its code, from the same real label map.

python bench/outside_knees.py [--weights easunet_jax/weights/eas_knee.npz] [--out DIR]

Knees: the reference knee's OAI-ZIB label map (`knee.REFERENCE`, in its own voxel order, 0.3646 x 0.3646 x
0.7 mm), scaled by 0.92-1.08 along each axis about the volume's centre and warped by a smooth elastic field
(2.5-3 mm, 15 mm smooth), the third mirrored left-right. Around the bones and plates, from distances to
them: body out to 32 ± 5 mm (a smooth field), skin its outer 2 mm, subcutaneous fat the 7 mm inside it,
muscle with islands of fat, muscle (rarer islands of fat) within 3 mm of bone and cartilage, a dark
meniscus-like wedge where femur and tibia are both within 5 mm, joint fluid where both are within 1.6 mm,
a patchy synovial film within 0.6 mm of the cartilage, a 1 mm cortex around the marrow. Four contrasts
(`CONTRASTS`): DESS with and without water excitation and T1-like, with ±8 % texture, blur (0.6 voxel
along the 0.7 mm slices), a bias field and Rician noise, and one intensity per label with a 1-voxel blur
and Gaussian noise; each set stored as a real set might be (`LAYOUTS`: the label map's own order in
float32, its axes transposed in int16, MetaImage in uint16, NRRD flipped); and DESS with water excitation
of knees with a large effusion (`SETS`: fluid up to 10 mm from the femur). Each set is segmented by
`predict.predict`, as `--mode=predict` does, and scored as bench/transfer.py scores.
Prints a Markdown table (mean ± std over knees; per knee, the share of FC found and of the FC marked that
lies in the femur) and one JSON line.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import transfer  # noqa: E402
from scipy import ndimage  # noqa: E402

from easunet_jax import metrics, predict, pretrained  # noqa: E402
from easunet_jax.data import knee, volumes  # noqa: E402
from easunet_jax.errors import run_cli  # noqa: E402

# Knees: (seed, elastic field mm, scale per voxel axis, mirrored left-right).
KNEES = ((11, 2.5, (1.05, 0.95, 1.0), False), (12, 3.0, (1.08, 0.93, 1.05), False),
         (13, 2.5, (0.92, 1.06, 0.95), True))
AIR, FAT, MUSCLE, SKIN, FLUID, MENISCUS, MARROW, CORTEX, FC, TC, FILM = range(11)
# Intensity of each tissue above, in that order.
CONTRASTS = {
    'DESS with water excitation': (0, 0.06, 0.28, 0.22, 0.95, 0.07, 0.12, 0.02, 0.55, 0.50, 0.90),
    'DESS without water excitation (fat bright)':
        (0, 0.85, 0.28, 0.30, 0.95, 0.06, 0.70, 0.03, 0.50, 0.48, 0.90),
    'T1-like (fluid dark, fat and marrow bright)':
        (0, 0.90, 0.35, 0.40, 0.20, 0.05, 0.80, 0.03, 0.45, 0.42, 0.20),
    'one intensity per label, Gaussian noise': None}
LABEL_INTENSITY = (0.10, 0.35, 0.80, 0.40, 0.75)  # background, femur, FC, tibia, TC
LAYOUTS = ('.nii.gz, float32', '.nii.gz, axes transposed, int16', '.mhd, uint16', '.nrrd, flipped, uint16')
# The sets: (contrast, effusion in mm, layout); an effusion fills the soft tissue this close to the femur,
# outside the menisci, over 2 mm from the tibia and within 40 mm of the femoral cartilage (the joint's
# recesses and the suprapatellar pouch, around the condyles).
SETS = tuple((contrast, 0.0, layout) for contrast, layout in zip(CONTRASTS, LAYOUTS, strict=True)) + (
    ('DESS with water excitation', 10.0, LAYOUTS[0]),)


def _smooth_field(shape: Sequence[int], sigma_mm: float, spacing: np.ndarray, rng: np.random.Generator
                  ) -> np.ndarray:
  """A smooth random field of unit standard deviation, drawn on a grid 8 times coarser and zoomed up."""
  coarse = tuple(int(np.ceil(n / 8)) + 1 for n in shape)
  field = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma_mm / (8 * spacing), mode='reflect')
  field = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse, strict=True)], order=1)
  field = field[tuple(slice(n) for n in shape)]
  return ((field - field.mean()) / field.std()).astype(np.float32)


def _knee(labels: np.ndarray, spacing: np.ndarray, seed: int, elastic_mm: float, scale: Sequence[float],
          mirrored: bool) -> np.ndarray:
  """`labels` scaled about the centre and warped (nearest neighbour): the source coordinates computed on a
  grid about 4x coarser whose first and last points are the volume's, and zoomed up linearly."""
  rng = np.random.default_rng(seed)
  centre = (np.array(labels.shape) - 1) / 2
  grid = np.meshgrid(*[np.linspace(0, n - 1, -(-n // 4) + 1, dtype=np.float32) for n in labels.shape],
                     indexing='ij')
  coordinates = []
  for axis in range(3):
    source = centre[axis] + (grid[axis] - centre[axis]) / scale[axis]
    source += _smooth_field(grid[0].shape, 15.0, 4 * spacing, rng) * elastic_mm / spacing[axis]
    coordinates.append(ndimage.zoom(source, [n / c for n, c in zip(labels.shape, source.shape, strict=True)],
                                    order=1))
  warped = ndimage.map_coordinates(labels, coordinates, order=0, mode='constant', cval=0).astype(np.uint8)
  return warped[:, :, ::-1].copy() if mirrored else warped  # the left-right axis is the label map's last


def _tissues(labels: np.ndarray, spacing: np.ndarray, seed: int, effusion_mm: float) -> np.ndarray:
  """Tissue codes around the bones (labels 1, 3) and plates (2, 4), from distances (mm) to them."""
  rng = np.random.default_rng(seed + 100)

  def distance(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)

  bone, cartilage = np.isin(labels, (1, 3)), np.isin(labels, (2, 4))
  joint = bone | cartilage
  to_joint, to_femur, to_tibia = (distance(mask) for mask in (joint, np.isin(labels, (1, 2)),
                                                               np.isin(labels, (3, 4))))
  body_mm = 32 + 5 * _smooth_field(labels.shape, 30.0, spacing, rng)
  body, mix = to_joint < body_mm, _smooth_field(labels.shape, 4.0, spacing, rng)
  tissue = np.where(body, MUSCLE, AIR).astype(np.uint8)
  tissue[body & (mix > 0.6)] = FAT
  tissue[body & (to_joint > body_mm - 9)] = FAT
  tissue[body & (to_joint > body_mm - 2)] = SKIN
  near = ~joint & (to_joint < 3)
  tissue[near] = np.where(mix[near] > 0.9, FAT, MUSCLE)
  between = ~joint & (to_femur < 5) & (to_tibia < 5)
  tissue[between] = MENISCUS
  tissue[~joint & (to_femur < 1.6) & (to_tibia < 1.6)] = FLUID
  if effusion_mm:
    recesses = (to_femur < effusion_mm) & (to_tibia > 2) & (distance(labels == 2) < 40)
    tissue[~joint & ~between & recesses] = FLUID
  patches = _smooth_field(labels.shape, 6.0, spacing, rng) > -0.3
  tissue[~joint & ~between & (distance(cartilage) < 0.6) & patches] = FILM
  tissue[bone] = MARROW
  tissue[bone & (ndimage.distance_transform_edt(bone, sampling=spacing) < 1)] = CORTEX
  tissue[labels == 2], tissue[labels == 4] = FC, TC
  return tissue


def _render(labels: np.ndarray, tissue: np.ndarray, spacing: np.ndarray, contrast: str, seed: int
            ) -> np.ndarray:
  """The image of a knee in `contrast`: its tissues' intensities with texture, blur, a bias field and Rician
  noise; one intensity per label, a 1-voxel blur and Gaussian noise for the per-label contrast."""
  rng = np.random.default_rng(seed)
  table = CONTRASTS[contrast]
  if table is None:
    image = ndimage.gaussian_filter(np.array(LABEL_INTENSITY, np.float32)[labels], 1.0)
    return image + rng.normal(0, 0.05, image.shape).astype(np.float32)
  image = np.array(table, np.float32)[tissue] * (1 + 0.08 * _smooth_field(labels.shape, 3.0, spacing, rng))
  image = ndimage.gaussian_filter(image, (0.5, 0.5, 0.6)) * np.exp(0.25 * _smooth_field(
      labels.shape, 40.0, spacing, rng))
  noise = rng.normal(0, 0.03, (2, *image.shape)).astype(np.float32)
  return np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)


def _scaled(image: np.ndarray, top: int, dtype: type) -> np.ndarray:
  """`image` from 0 to its 99.9th percentile scaled to 0-`top` integers."""
  return np.clip(np.round(image / np.percentile(image, 99.9) * top), 0, top).astype(dtype)


def _write_itk(array: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
  """A MetaImage or NRRD file (by `path`'s suffix) of `array` (voxel order of `affine`, RAS mm), written in a
  folder beside it and moved into place, the header last: a stopped run leaves no half file."""
  image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
  spacing = nib.affines.voxel_sizes(affine)
  to_lps = np.diag([-1.0, -1.0, 1.0])
  image.SetSpacing(spacing.tolist())
  image.SetDirection((to_lps @ affine[:3, :3] / spacing).ravel().tolist())
  image.SetOrigin((to_lps @ affine[:3, 3]).tolist())
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as folder:
    sitk.WriteImage(image, str(pathlib.Path(folder) / path.name))
    for written in sorted(pathlib.Path(folder).iterdir(), key=lambda p: p.name == path.name):
      written.replace(path.parent / written.name)


def _store(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, layout: str, folder: pathlib.Path,
           case: str) -> None:
  """Writes the labels and then the image (the same grid) under `folder`/labels and /images in `layout`."""
  images, label_dir = folder / 'images', folder / 'labels'
  if layout == LAYOUTS[0]:
    volumes.save_volume(label_dir / f'{case}.nii.gz', labels, affine)
    volumes.save_volume(images / f'{case}.nii.gz', image.astype(np.float32), affine)
  elif layout == LAYOUTS[1]:  # the left-right axis first
    order = (2, 0, 1)
    moved = affine.copy()
    moved[:, :3] = affine[:, order]
    volumes.save_volume(label_dir / f'{case}.nii.gz', labels.transpose(order), moved)
    volumes.save_volume(images / f'{case}.nii.gz', _scaled(image, 4095, np.int16).transpose(order), moved)
  elif layout == LAYOUTS[2]:
    _write_itk(labels, affine, label_dir / f'{case}.mhd')
    _write_itk(_scaled(image, 1000, np.uint16), affine, images / f'{case}.mhd')
  else:  # the second voxel axis reversed, the affine with it
    flipped = affine.copy()
    flipped[:, 1] = -affine[:, 1]
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 1] * (image.shape[1] - 1)
    volumes.save_volume(label_dir / f'{case}.nii.gz', labels[:, ::-1], flipped)
    _write_itk(_scaled(image, 4095, np.uint16)[:, ::-1], flipped, images / f'{case}.nrrd')


def write_sets(out: pathlib.Path) -> dict[str, pathlib.Path]:
  """The sets under `out`, {name: folder with images/ and labels/}; knees already written are kept, in an
  `out` whose volumes were made with these settings (else DataError)."""
  transfer.check_made_with(out, json.loads(json.dumps(
      {'knees': KNEES, 'sets': SETS, 'contrasts': CONTRASTS, 'label_intensity': LABEL_INTENSITY})))
  reference = nib.load(knee.REFERENCE)
  labels, affine = np.asarray(reference.dataobj).astype(np.uint8), reference.affine
  spacing = nib.affines.voxel_sizes(affine)
  names = [f'{contrast}{f", a large effusion ({effusion_mm:g} mm)" if effusion_mm else ""}; {layout}'
           for contrast, effusion_mm, layout in SETS]
  sets = {name: out / name for name in names}
  for i, (seed, elastic_mm, scale, mirrored) in enumerate(KNEES):
    case = f'knee_{i:03d}'
    # Those an earlier run into the same --out wrote are kept (images are written after their labels).
    missing = [k for k, name in enumerate(names)
               if not ((sets[name] / 'images').is_dir() and volumes.label_file(sets[name] / 'images', case))]
    if not missing:
      continue
    warped = _knee(labels, spacing, seed, elastic_mm, scale, mirrored)
    tissues = {mm: _tissues(warped, spacing, seed, mm) for mm in {SETS[k][1] for k in missing}}
    for k in missing:
      contrast, effusion_mm, layout = SETS[k]
      image = _render(warped, tissues[effusion_mm], spacing, contrast, 1000 + 10 * k + i)
      _store(image, warped, affine, layout, sets[names[k]], case)
  return sets


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--out', default='', help='where the sets and masks go (default: a temp dir); knees '
                      'already there are reused')
  args = parser.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='outside_knees_'))
  config = pretrained.config_of(args.weights)
  results = {}
  for name, folder in write_sets(out).items():
    # Masks of an earlier run with the same model and settings are kept: a rerun scores them again.
    cases = []
    for result in predict.predict(config, None, folder / 'images', folder / 'masks', args.weights,
                                  continue_prediction=True):
      case = volumes.volume_stem(pathlib.Path(result['input']).name)
      label_path = volumes.label_file(folder / 'labels', case)
      labels, spacing = volumes.load_labels(  # OAI-ZIB's labels as they are: femur 1, FC 2, tibia 3, TC 4
          volumes.Case(case, None, label_path), ((1, 1), (2, 2), (3, 3), (4, 4)))
      mask, _ = volumes.load_labels(volumes.Case(case, None, pathlib.Path(result['output'])),
                                    ((1, 1), (2, 2)))
      fc = mask == 1
      cases.append({**transfer.score(mask, labels, spacing),
                    'fc_recall': metrics.segmentation_metrics(fc, labels == 2, spacing)['recall'],
                    'fc_in_femur': 100 * np.mean(labels[fc] == 1)})
    results[name] = cases
  print(f'Model {args.weights}, {len(KNEES)} knees per set, 3D Dice %, error of mean thickness (prediction - '
        'truth, mm), mean ± std over knees (the population std, ddof 0); the share of the femoral cartilage '
        'found (FC recall %) and of the FC marked that lies in the labelled femur (%), per knee:\n')
  print('| contrast; storage | FC | TC | mean | FC thickness error | TC thickness error | FC recall | FC in '
        'femur |')
  print('|---|---|---|---|---|---|---|---|')
  for name, cases in results.items():
    fc, tc, fc_t, tc_t = (np.array([c[k] for c in cases])
                          for k in ('fc', 'tc', 'fc_thickness_error_mm', 'tc_thickness_error_mm'))
    recall, in_femur = (' / '.join(f'{c[k]:.1f}' for c in cases) for k in ('fc_recall', 'fc_in_femur'))
    print(f'| {name} | {fc.mean():.1f} ± {fc.std():.1f} | {tc.mean():.1f} ± {tc.std():.1f} | '
          f'{(fc.mean() + tc.mean()) / 2:.1f} | {fc_t.mean():+.2f} ± {fc_t.std():.2f} | '
          f'{tc_t.mean():+.2f} ± {tc_t.std():.2f} | {recall} | {in_femur} |')
  print(json.dumps({'weights': args.weights, 'out': str(out), 'dice': results}))


if __name__ == '__main__':
  run_cli(main)
