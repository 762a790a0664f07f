"""Transfer check of a model file: 3D Dice on knees it never trained on, in contrasts it never saw.

python bench/transfer.py [--weights easunet_jax/weights/eas_knee.npz] [--num 3] [--out DIR] [--every 1]
                         [--single_grid] [--slice_sigma_mm MM] [--zoom Z] [--background_weight W]
                         [--more_sets]

Test knees: real-anatomy phantoms (`data.knee`) of dataset seed 1000 (the shipped model trained on seeds 0,
2, 4 to 8, 11 and 12, bench/calibrate.py uses 3000: other deformations, sizes, thickness factors and
sides), at OAI-ZIB geometry (160 x 384 x 384, 0.7 x 0.3646 x 0.3646 mm), each rendered DESS-like and
TSE-like by the phantom's numpy renderer (`knee.render`), a code path apart from the training's
on-device synthesis (`data.synth`), and DESS-like from its bone and cartilage labels alone (everything
else one soft tissue); the same knees osteoarthritic
(`knee.make_tissues`'s `oa_fraction`: thinner plates, a narrower joint, focal defects filled with fluid),
DESS-like and from their labels alone; and, for comparison, schematic phantoms (`data.phantom`,
DESS-like) of the same seed. With `--more_sets`, also the same knees rendered from their OAI-ZIB labels
alone by the simplest synthesiser a user might write (one intensity per label, blur, noise; five intensity
tables: dark, grey and bright background, bright bone, cartilage the only contrast), DESS-like with water
excitation (OAI's DESS: fat and fatty marrow dark), DESS-like knees whose shapes stray twice as far from
the reference knee as the phantoms' by default (`knee.make_tissues`'s `elastic_mm` doubled: a step towards
other knees than the one all phantoms come from), healthy and osteoarthritic, and DESS-like on a 3D
DESS scan's grid (80 x 512 x 512, 1.5 x 0.2734 x 0.2734 mm), sampled at the slice centres and, as a scan's
thick slices average what they cross, each slice the mean of three 0.5 mm slices; the last also with each
of three artefacts of real scans (a surface coil's bright skin, Gibbs ringing, a motion ghost).
Each set is segmented by `predict.predict` from its NIfTI files, as `--mode=predict` does, and scored
against its labels with `metrics.segmentation_metrics` and the error of `measures.mean_thickness_mm`.
Prints a Markdown table (mean ± std over knees) and one JSON line.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from easunet_jax import measures, metrics, predict, pretrained  # noqa: E402
from easunet_jax.data import knee, phantom, volumes  # noqa: E402
from easunet_jax.errors import DataError, positive_int, run_cli  # noqa: E402

SEED = 1000  # the shipped model trained on dataset seeds 0, 2, 4 to 8, 11 and 12
# --more_sets: intensity per OAI-ZIB label (background, femur, FC, tibia, TC) of the per-label synthesiser.
PER_LABEL = {'dark background': (0.02, 0.35, 0.7, 0.35, 0.7), 'grey background': (0.2, 0.35, 0.7, 0.35, 0.7),
             'bright background': (0.55, 0.3, 0.75, 0.3, 0.75), 'bright bone': (0.25, 0.85, 0.5, 0.85, 0.5),
             'cartilage the only contrast': (0.4, 0.4, 0.8, 0.4, 0.8)}
SCAN_GRID = ((80, 512, 512), (1.5, 0.2734, 0.2734))  # a 3D DESS scan's: thick slices, fine pixels
SCAN_GRID_SETS = ('real anatomy, DESS-like, 80 x 512 x 512 grid, 1.5 mm slices',
                  'real anatomy, DESS-like, 80 x 512 x 512 grid, 1.5 mm slices with partial volume')
SUB_SLICES = 3  # of a thick slice with partial volume
# --more_sets: knees whose shapes stray twice as far from the reference knee as the phantoms' by default.
STRAYED = f'shapes strayed twice as far ({2 * knee.ELASTIC_MM:g} mm elastic field)'
STRAYED_SETS = (f'real anatomy, DESS-like, {STRAYED}', f'real anatomy, osteoarthritic, DESS-like, {STRAYED}')
# --more_sets: the partial-volume scan with an artefact of real scans (`_artefacts`).
ARTEFACT_SETS = tuple(f'{SCAN_GRID_SETS[1]}, {artefact}' for artefact in (
    'surface coil (3x bright at the skin)', 'Gibbs ringing (60 % of k-space)',
    'motion ghost (25 %, a quarter field of view away)'))


def _thick_slices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A DESS-like knee on SCAN_GRID whose slices average SUB_SLICES thinner ones (through-plane partial
  volume, which the training's 2D synthesis never draws), labelled at the slice centres: (image, tissue
  codes, affine)."""
  (n, *plane), (thickness, *pixel) = SCAN_GRID
  fine, tissue, _ = knee.make_tissues(seed, (n * SUB_SLICES, *plane), (thickness / SUB_SLICES, *pixel),
                                      contrast='dess')
  image = fine.reshape(n, SUB_SLICES, *plane).mean(1)
  return image, tissue[SUB_SLICES // 2::SUB_SLICES], phantom.affine_for(*SCAN_GRID)


def _artefacts(image: np.ndarray, tissue: np.ndarray, spacing: Sequence[float]) -> list[np.ndarray]:
  """`image` with, in turn, three artefacts of real scans (ARTEFACT_SETS): the signal of a surface coil,
  up to 3x near the skin and falling with depth (15 mm scale) into the body (`tissue` not air); Gibbs
  ringing of a reconstruction zero-filled from the central 60 % of k-space along each in-plane axis; a
  motion ghost along the phase-encoding axis (anterior-posterior), a 25 % copy of the image shifted by a
  quarter of the field of view."""
  depth = ndimage.distance_transform_edt(tissue != phantom.AIR, sampling=spacing)
  coil = image * (1 + 2 * np.exp(-depth / 15.0))
  kspace = np.fft.fftshift(np.fft.fft2(image), axes=(1, 2))
  keep = [np.abs(np.arange(n) - n // 2) < 0.3 * n for n in image.shape[1:]]
  truncated = kspace * (keep[0][:, None] & keep[1][None, :])
  gibbs = np.abs(np.fft.ifft2(np.fft.ifftshift(truncated, axes=(1, 2))))
  ghost = image + 0.25 * np.roll(image, image.shape[1] // 4, axis=1)
  return [a.astype(np.float32) for a in (coil, gibbs, ghost)]


def _labels_only(tissue: np.ndarray, spacing: Sequence[float], seed: int) -> np.ndarray:
  """A DESS-like image of only what a label map of bone and cartilage holds, the rest one soft tissue: as a
  renderer of OAI-ZIB label maps without a tissue model would draw them."""
  bare = np.select([tissue == code for code in (phantom.FC, phantom.TC)] + [
      phantom.LABEL_OF_TISSUE[tissue] == label for label in (1, 3)],
      [phantom.FC, phantom.TC, phantom.FEMUR, phantom.TIBIA], phantom.MUSCLE).astype(np.uint8)
  return knee.render(bare, spacing, np.random.default_rng([seed, 2]), 'dess')


def _water_excitation(tissue: np.ndarray, spacing: Sequence[float], seed: int) -> np.ndarray:
  """DESS-like with water excitation, as OAI acquires DESS: fat, and the fatty marrow of femur, tibia and
  patella, at a fifth of their DESS-like intensity (`knee.render`'s other draws)."""
  rng = np.random.default_rng([seed, 4])
  intensity = phantom.dess_intensities(rng)
  intensity[[phantom.FAT, phantom.FEMUR, phantom.TIBIA, phantom.PATELLA]] /= 5
  return phantom.render(tissue, intensity, spacing, rng, blur=rng.uniform(0.5, 0.8),
                        bias=rng.uniform(-0.2, 0.2, 5), noise=rng.uniform(0.03, 0.05))


def check_made_with(out: pathlib.Path, made_with: dict) -> None:
  """Records in `out` the settings its volumes are made with, or refuses an `out` whose volumes were made
  with others: a volume is kept once written, and would be taken for one of these settings."""
  record = out / 'made_with.json'
  if record.exists() and (recorded := json.loads(record.read_text())) != made_with:
    raise DataError(f'{out} holds volumes made with {recorded}, not {made_with}: give another --out')
  out.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps(made_with))


def write_sets(out: pathlib.Path, num: int, every: int, more: bool, dataset_seed: int = SEED
               ) -> dict[str, pathlib.Path]:
  """The test sets of `dataset_seed` under `out`: {set name: folder with images/ and labels/}."""
  shape = (phantom.DEFAULT_SHAPE[0] // every, *phantom.DEFAULT_SHAPE[1:])
  spacing = (phantom.DEFAULT_SPACING[0] * every, *phantom.DEFAULT_SPACING[1:])
  names = ['real anatomy, DESS-like', 'real anatomy, TSE-like', 'real anatomy, labels only, DESS-like',
           'real anatomy, osteoarthritic, DESS-like', 'real anatomy, osteoarthritic, labels only, DESS-like',
           'schematic phantom, DESS-like']
  if more:
    names += [f'real anatomy, labels only, per-label intensities: {name}' for name in PER_LABEL]
    names += ['real anatomy, DESS-like with water excitation (fat and marrow dark)']
    names += list(STRAYED_SETS)
    names += list(SCAN_GRID_SETS) + list(ARTEFACT_SETS)
  sets = {name: out / name for name in names}
  check_made_with(out, {'every': every, 'dataset_seed': dataset_seed})
  for i in range(num):
    case = f'knee_{i:03d}'
    if all((folder / 'images' / f'{case}.nii.gz').exists() for folder in sets.values()):
      continue  # written by an earlier run into the same --out (images are written last)
    seed = phantom.subject_seed(dataset_seed, i)
    dess, tissue, affine = knee.make_tissues(seed, shape, spacing, contrast='dess')
    tse = knee.render(tissue, spacing, np.random.default_rng([seed, 1]), 'tse')
    oa, oa_tissue, _ = knee.make_tissues(seed, shape, spacing, contrast='dess', oa_fraction=1.0)
    schematic, schematic_tissue, _ = phantom.make_tissues(seed, shape, spacing)
    renderings = [(dess, tissue, affine), (tse, tissue, affine),
                  (_labels_only(tissue, spacing, seed), tissue, affine), (oa, oa_tissue, affine),
                  (_labels_only(oa_tissue, spacing, seed), oa_tissue, affine),
                  (schematic, schematic_tissue, affine)]
    if more:
      labels = phantom.LABEL_OF_TISSUE[tissue]
      renderings += [(phantom.render(labels, 500 * np.array(table), spacing, np.random.default_rng([seed, 3]),
                                     blur=0.6, bias=np.zeros(5), noise=0.04), tissue, affine)
                     for table in PER_LABEL.values()]
      renderings += [(_water_excitation(tissue, spacing, seed), tissue, affine)]
      renderings += [knee.make_tissues(seed, shape, spacing, contrast='dess', oa_fraction=oa,
                                       elastic_mm=2 * knee.ELASTIC_MM) for oa in (0.0, 1.0)]
      scan, scan_tissue, scan_affine = _thick_slices(seed)
      renderings += [knee.make_tissues(seed, *SCAN_GRID, contrast='dess'), (scan, scan_tissue, scan_affine)]
      renderings += [(image, scan_tissue, scan_affine)
                     for image in _artefacts(scan, scan_tissue, SCAN_GRID[1])]
    for name, (image, codes, grid) in zip(sets, renderings):
      volumes.save_volume(sets[name] / 'labels' / f'{case}.nii.gz', phantom.LABEL_OF_TISSUE[codes], grid)
      volumes.save_volume(sets[name] / 'images' / f'{case}.nii.gz', image, grid)
  return sets


def score(classes: np.ndarray, labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
  """3D Dice (%) of training classes (1 FC, 2 TC) against OAI-ZIB labels (2 FC, 4 TC), per plate ('fc',
  'tc'), and the error of their mean thickness (prediction - truth, mm; 'fc_thickness_error_mm', ...)."""
  result = {}
  for plate, k in volumes.CLASSES.items():
    value = volumes.OAI_ZIB_CARTILAGE[plate]
    result[plate] = metrics.segmentation_metrics(classes == k, labels == value, spacing)['dice']
    result[f'{plate}_thickness_error_mm'] = (measures.mean_thickness_mm(classes == k, spacing)
                                             - measures.mean_thickness_mm(labels == value, spacing))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--num', type=positive_int, default=3, help='test knees per set')
  parser.add_argument('--out', default='', help='where the test sets and masks go (default: a temp dir); '
                      'test knees already there are reused, and masks the same model and settings made')
  parser.add_argument('--every', type=positive_int, default=1,
                      help='every N-th sagittal slice only (N x faster)')
  parser.add_argument('--single_grid', action='store_true',
                      help='predict on one sampling grid (predict.subpixel_tta=False)')
  parser.add_argument('--slice_sigma_mm', type=float, default=None,
                      help="smoothing across sagittal slices (predict.slice_sigma_mm; default: the model's)")
  parser.add_argument('--zoom', type=float, default=None,
                      help="anatomy enlarged by this for the network (predict.zoom; default: the model's)")
  parser.add_argument('--background_weight', type=float, default=None,
                      help="background probability's weight in the argmax (predict.background_weight; "
                      "default: the model's)")
  parser.add_argument('--more_sets', action='store_true',
                      help="also the per-label synthesiser's renderings and a 3D DESS scan's grid, with "
                      'artefacts')
  args = parser.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='transfer_'))
  config = pretrained.config_of(args.weights)
  config.predict.subpixel_tta = not args.single_grid
  if args.slice_sigma_mm is not None:
    config.predict.slice_sigma_mm = args.slice_sigma_mm
  if args.zoom is not None:
    config.predict.zoom = args.zoom
  if args.background_weight is not None:
    config.predict.background_weight = args.background_weight
  sets = write_sets(out, args.num, args.every, args.more_sets)
  results = {}
  for name, folder in sets.items():
    # Masks of an earlier run with the same model and settings are kept: a rerun scores them again.
    predict.predict(config, None, folder / 'images', folder / 'masks', args.weights, continue_prediction=True)
    cases = []
    for label_path in sorted((folder / 'labels').iterdir()):
      labels, spacing = volumes.load_labels(volumes.Case(label_path.name, None, label_path),
                                            ((2, 2), (4, 4)))
      mask, _ = volumes.load_labels(volumes.Case(label_path.name, None, folder / 'masks' / label_path.name),
                                    ((1, 1), (2, 2)))
      cases.append(score(mask, labels, spacing))
    results[name] = cases
  grids = 'one sampling grid' if args.single_grid else 'four half-pixel sampling grids'
  print(f'Model {args.weights} ({grids}, slices smoothed by {config.predict.slice_sigma_mm:g} mm, zoom '
        f'{config.predict.zoom:g}, background weight {config.predict.background_weight:g}), '
        f'{args.num} knees per set, 3D Dice % and error of mean thickness (prediction - truth, mm), '
        'mean ± std over knees (the population std, ddof 0):\n')
  print('| test set | FC | TC | mean | FC thickness error | TC thickness error |')
  print('|---|---|---|---|---|---|')
  for name, cases in results.items():
    fc, tc, fc_t, tc_t = (np.array([c[k] for c in cases])
                          for k in ('fc', 'tc', 'fc_thickness_error_mm', 'tc_thickness_error_mm'))
    print(f'| {name} | {fc.mean():.1f} ± {fc.std():.1f} | {tc.mean():.1f} ± {tc.std():.1f} | '
          f'{(fc.mean() + tc.mean()) / 2:.1f} | {fc_t.mean():+.2f} ± {fc_t.std():.2f} | '
          f'{tc_t.mean():+.2f} ± {tc_t.std():.2f} |')
  print(json.dumps({'weights': args.weights, 'out': str(out), 'every': args.every,
                    'subpixel_tta': config.predict.subpixel_tta,
                    'slice_sigma_mm': config.predict.slice_sigma_mm, 'zoom': config.predict.zoom,
                    'background_weight': config.predict.background_weight,
                    'dice': results}))


if __name__ == '__main__':
  run_cli(main)
