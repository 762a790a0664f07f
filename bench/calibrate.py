"""Calibration of `predict.background_weight` for a model file, on knees that neither its training nor the
transfer bench uses.

python bench/calibrate.py [--weights easunet_jax/weights/eas_knee.npz] [--num 3] [--every 2] [--seed 3000]
                          [--out DIR] [--background_weights 1,1.25,1.5,1.75,2,2.5,3]

The five real-anatomy sets of bench/transfer.py (DESS-like, TSE-like and labels only; osteoarthritic
DESS-like and labels only), made from dataset `--seed` (the shipped model trained on seeds 0, 2, 4
to 8, 11 and 12, the transfer bench tests on 1000), are segmented by predict's pipeline with the model's
settings (`inference.class_probabilities` once per knee, then `predict.to_classes` and
`predict.remove_small_components` for each weight) and scored as bench/transfer.py scores them. Prints a
Markdown table per weight (3D Dice %, mean over knees, and the error of mean thickness in mm), the weight
of the best mean Dice over all sets and plates, and one JSON line.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import transfer  # noqa: E402

from easunet_jax import inference, predict, pretrained  # noqa: E402
from easunet_jax.data import volumes  # noqa: E402
from easunet_jax.errors import positive_int, run_cli  # noqa: E402

SEED = 3000


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--num', type=positive_int, default=3, help='knees per set')
  parser.add_argument('--every', type=positive_int, default=2,
                      help='every N-th sagittal slice only (N x faster)')
  parser.add_argument('--seed', type=int, default=SEED, help='dataset seed of the knees')
  parser.add_argument('--out', default='', help='where the knees go (default: a temp dir); knees already '
                      'there are reused')
  parser.add_argument('--background_weights', default='1,1.25,1.5,1.75,2,2.5,3',
                      help='comma-separated weights to score')
  args = parser.parse_args()
  weights = [float(w) for w in args.background_weights.split(',')]
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='calibrate_'))
  config = pretrained.config_of(args.weights)
  sets = {name: folder for name, folder in
          transfer.write_sets(out, args.num, args.every, False, args.seed).items() if 'real anatomy' in name}
  _, network, pixel = predict.load_network(config, None, args.weights)
  scores = {w: {name: [] for name in sets} for w in weights}
  for name, folder in sets.items():
    for image_path in sorted((folder / 'images').iterdir()):
      image, spacing = volumes.canonical_image(volumes.open_volume(image_path), image_path)
      label_path = folder / 'labels' / image_path.name
      labels, _ = volumes.load_labels(volumes.Case(image_path.name, None, label_path), ((2, 2), (4, 4)))
      probabilities = inference.class_probabilities(
          network, image, spacing, pixel, config.predict.subpixel_tta, config.predict.slice_sigma_mm)
      for w in weights:
        classes = predict.remove_small_components(predict.to_classes(probabilities, w), spacing,
                                                  config.predict.min_component_mm3,
                                                  config.predict.min_component_fraction)
        scores[w][name].append(transfer.score(classes, labels, spacing))
      print(f'{name}: {image_path.name} scored', flush=True)
  print(f'\nModel {args.weights} (zoom {config.predict.zoom:g}, its background weight '
        f'{config.predict.background_weight:g}), {args.num} knees per set of dataset seed {args.seed}, '
        '3D Dice % FC / TC and error of mean thickness FC / TC (prediction - truth, mm), mean over knees:\n')
  print('| background weight | ' + ' | '.join(name.removeprefix('real anatomy, ') for name in sets)
        + ' | mean Dice |')
  print('|---|' + '---|' * (len(sets) + 1))
  means = {}
  for w in weights:
    cells = []
    for cases in scores[w].values():
      fc, tc, fc_t, tc_t = (np.mean([c[k] for c in cases])
                            for k in ('fc', 'tc', 'fc_thickness_error_mm', 'tc_thickness_error_mm'))
      cells.append(f'{fc:.1f} / {tc:.1f} ({fc_t:+.2f} / {tc_t:+.2f})')
    means[w] = np.mean([[c['fc'], c['tc']] for cases in scores[w].values() for c in cases])
    print(f'| {w:g} | ' + ' | '.join(cells) + f' | {means[w]:.2f} |')
  best = max(means, key=means.get)
  print(f'\nbest mean Dice: background weight {best:g}')
  print(json.dumps({'weights': args.weights, 'out': str(out), 'seed': args.seed, 'every': args.every,
                    'best_background_weight': best, 'mean_dice': {str(w): m for w, m in means.items()},
                    'scores': {str(w): by_set for w, by_set in scores.items()}}))


if __name__ == '__main__':
  run_cli(main)
