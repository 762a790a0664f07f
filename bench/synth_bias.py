"""A model file's thickness bias on its own training distribution: real-anatomy phantom knees, drawn as its
training draws them, their tissue maps rendered by the training synthesis, segmented slice by slice in the
training grid (no resampling, zoom or test-time averaging), so that what the table shows is the network's
and not a renderer's or the prediction pipeline's.

python bench/synth_bias.py [--weights easunet_jax/weights/eas_knee.npz] [--num 6] [--seed 3000]
                           [--oa_fraction 0.5] [--draws 2] [--render synth|dess|tse]

Knees of dataset `--seed` (the shipped model trained on seeds 0, 2, 4 to 8, 11 and 12; 3000 is
bench/calibrate.py's), in the model's phantom grid, with its elastic spread, osteoarthritic with
probability `--oa_fraction`; each is rendered `--draws` times (`synth.render_batch`), or with
`--render=dess` or `tse` once by the phantom's own DESS-like or TSE-like renderer (the transfer bench's)
and normalised as the slice store is, to tell the renderer's share of a bias from the network's. Prints a
Markdown table per knee, thinnest cartilage first: true mean thickness, the prediction's error of it, the
ratio of predicted to true volume and 3D Dice (means over draws), and one JSON line.
"""

from easunet_jax import environment

environment.configure()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transfer  # noqa: E402

from easunet_jax import measures, parallel, pretrained, steps  # noqa: E402
from easunet_jax.data import knee, phantom, preprocess, synth, volumes  # noqa: E402
from easunet_jax.errors import positive_int, run_cli  # noqa: E402

PLATES = [(name, k, volumes.OAI_ZIB_CARTILAGE[name]) for name, k in volumes.CLASSES.items()]  # class, label


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--weights', default=str(pretrained.SHIPPED), help='a model file (--mode=export)')
  parser.add_argument('--num', type=positive_int, default=6, help='knees')
  parser.add_argument('--seed', type=int, default=3000, help='dataset seed of the knees')
  parser.add_argument('--oa_fraction', type=float, default=0.5, help='share of osteoarthritic knees')
  parser.add_argument('--draws', type=positive_int, default=2, help='renderings per knee (--render=synth)')
  parser.add_argument('--render', choices=('synth', *knee.CONTRASTS), default='synth',
                      help="the training synthesis, or the phantom's DESS-like or TSE-like renderer")
  parser.add_argument('--batch', type=positive_int, default=16, help='slices per forward pass')
  args = parser.parse_args()
  config = pretrained.config_of(args.weights)
  _, graphdef, state = pretrained.load(config, args.weights, parallel.make_mesh())
  forward = jax.jit(functools.partial(steps.forward, graphdef=graphdef))
  shape, spacing = config.data.phantom_shape, config.data.phantom_spacing
  draws = args.draws if args.render == 'synth' else 1
  contrast = 'dess' if args.render == 'synth' else args.render  # the synthesis ignores the image
  rows = []
  for i in range(args.num):
    image, tissue, _ = knee.make_tissues(phantom.subject_seed(args.seed, i), shape, spacing, contrast,
                                         args.oa_fraction, config.data.phantom_elastic_mm,
                                         config.data.phantom_effusion_mm)
    image = preprocess.normalise(image).astype(np.float32)[..., None]
    labels = phantom.LABEL_OF_TISSUE[tissue]
    row = {'knee': i} | {f'{name}_thickness_mm': measures.mean_thickness_mm(labels == value, spacing)
                         for name, _, value in PLATES}
    scores = []
    for draw in range(draws):
      batches = (synth.render_batch(jax.random.fold_in(jax.random.key(draw), i * len(tissue) + s),
                                    jnp.asarray(tissue[s:s + args.batch], jnp.int32))
                 if args.render == 'synth' else jnp.asarray(image[s:s + args.batch])
                 for s in range(0, len(tissue), args.batch))
      classes = np.concatenate([np.asarray(jnp.argmax(forward(state, batch), -1)) for batch in batches])
      scores.append(transfer.score(classes, labels, spacing) | {
          f'{name}_volume_ratio': np.count_nonzero(classes == k) / max(np.count_nonzero(labels == value), 1)
          for name, k, value in PLATES})
    rows.append(row | {key: float(np.mean([s[key] for s in scores])) for key in scores[0]})
    print(f'knee {i} of {args.num} done', flush=True)
  describe = (f'{draws} training-synthesis draws each' if args.render == 'synth'
              else f"the phantom's {args.render.upper()}-like rendering")
  rows.sort(key=lambda r: r['fc_thickness_mm'] + r['tc_thickness_mm'])
  print(f'Model {args.weights}, {args.num} knees of dataset seed {args.seed} ({shape}, {spacing} mm), '
        f'{describe}; true mean thickness, error of the predicted one '
        '(prediction - truth), predicted / true volume, 3D Dice %:\n')
  print('| knee | FC thickness mm | error | volume ratio | Dice | TC thickness mm | error | volume ratio | '
        'Dice |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['knee']} | " + ' | '.join(
        f"{r[f'{p}_thickness_mm']:.2f} | {r[f'{p}_thickness_error_mm']:+.2f} | "
        f"{r[f'{p}_volume_ratio']:.2f} | {r[p]:.1f}" for p, _, _ in PLATES) + ' |')
  print(json.dumps({'weights': args.weights, 'seed': args.seed, 'render': args.render, 'draws': draws,
                    'knees': rows}))


if __name__ == '__main__':
  run_cli(main)
