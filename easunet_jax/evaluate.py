"""Test-set evaluation of a trained checkpoint: per-volume (3D) and per-slice (2D) metrics of FC and TC, a
Table-1-shaped report beside the paper's numbers, loss curves and prediction overlays."""

import contextlib
import csv
import functools
import json
import math
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import ndimage

from easunet_jax import checkpoints, metrics, train
from easunet_jax.data import pipeline

matplotlib.use('Agg')  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

CLASSES = {'fc': 1, 'tc': 2}  # report name -> training class
METRICS = ('dice', 'precision', 'recall', 'hd', 'hd95', 'assd')
# Paper Table 1, EAS U-Net (OAI-ZIB, 2D per cartilage slice); it reports no HD95 or ASSD.
PAPER_EAS_UNET = {'fc': {'dice': 90.37, 'precision': 91.69, 'recall': 90.27, 'hd': 6.34},
                  'tc': {'dice': 89.90, 'precision': 89.09, 'recall': 90.37, 'hd': 4.34}}
_COLOURS = {'fc': (1.0, 0.25, 0.1), 'tc': (0.1, 0.6, 1.0)}  # overlay colours, far apart for colour-blind eyes


def _requested_step(mngr: ocp.CheckpointManager, requested: str | int) -> int:
  """The step that eval.checkpoint ('best' | 'latest' | a step number) names in `mngr`."""
  directory = mngr.directory
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}: train this workdir first')
  requested = str(requested)
  if requested == 'latest':
    return mngr.latest_step()
  if requested == 'best':
    step = mngr.best_step()
    if step is None:
      raise ValueError(f'no checkpoint in {directory} has validation metrics to pick the best from; '
                       'pass --config.eval.checkpoint=latest or a step')
    return step
  if not requested.isdigit():
    raise ValueError(f"eval.checkpoint: expected 'best', 'latest' or a step number, got {requested!r}")
  if int(requested) not in steps:
    raise ValueError(f'eval.checkpoint: step {requested} is not in {directory} (steps: '
                     f'{", ".join(map(str, sorted(steps)))})')
  return int(requested)


def restore_state(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: jax.sharding.Mesh
                  ) -> tuple[int, nnx.GraphDef, train.TrainState]:
  """(step, evaluation graphdef, state) of the checkpoint eval.checkpoint names, replicated over `mesh`."""
  directory = workdir.absolute() / 'checkpoints'
  if not directory.is_dir():  # checked first: the manager would create the folder
    raise FileNotFoundError(f'no checkpoint in {directory}: train this workdir first')
  with _unreadable_as_one_line(directory):  # the manager reads every step's metrics
    mngr = checkpoints.manager(workdir, config.checkpoint.keep)
  try:
    step = _requested_step(mngr, config.eval.checkpoint)
    with _unreadable_as_one_line(directory / str(step)):
      saved = checkpoints.saved_config(mngr, step)
    checkpoints.check_same_model(saved, config.model, directory / str(step))
    # The restored state must have the trained one's structure; num_steps only shapes the learning-rate
    # schedule, which evaluation never calls.
    tx = train.make_optimizer(config.optim, num_steps=1)
    _, eval_graphdef, abstract = train.create_train_state(config, tx, NamedSharding(mesh, P()))
    with _unreadable_as_one_line(directory / str(step)):
      state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
  finally:
    mngr.close()
  return step, eval_graphdef, state


def _drop_closed_loop_errors() -> None:
  """Silences the reads that a failed orbax restore leaves in flight: each one that completes later calls
  back into the event loop orbax has closed, and Python would print a 'RuntimeError: Event loop is closed'
  traceback for each (hundreds) after the one-line error. Other unraisable errors still reach the hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_errors', False):
    return

  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop_errors = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _unreadable_as_one_line(path: pathlib.Path) -> Iterator[None]:
  """Turns what orbax and tensorstore raise on missing, truncated or foreign checkpoint files into one line
  that names `path`."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - tensorstore reports a truncated array file as a bare Exception
    # Only orbax reads run in this block, so whatever fails here is the checkpoint's files.
    _drop_closed_loop_errors()
    reason = ' '.join(str(e).split()) or type(e).__name__
    reason = reason if len(reason) <= 160 else reason[:160] + '...'  # tensorstore's run to pages
    raise ValueError(f'{path}: unreadable or corrupt checkpoint ({reason})') from None


def _predict_step(state: train.TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
  logits_BHWK = nnx.merge(graphdef, state.params, state.batch_stats)(image_BHW1)
  return jnp.argmax(logits_BHWK, axis=-1).astype(jnp.uint8)


def predict_volumes(predict, state: train.TrainState, store_dir: pathlib.Path, batch_size: int,
                    data_sharding: NamedSharding) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
  """(store rows, predicted classes, label classes) of each test volume in store order, the slices cropped
  to the source's in-plane size and stacked into (slices, H, W); one volume is held at a time."""
  rows = pipeline.read_index(store_dir / 'test')
  done, case_rows, case_pred, case_label = 0, [], [], []
  for batch in pipeline.eval_batches(store_dir, batch_size, split='test'):
    image = pipeline.put_on_mesh({'image': batch['image']}, data_sharding)['image']
    pred_BHW = jax.device_get(predict(state, image))
    for pred_HW, label_HW in zip(pred_BHW[batch['mask']], batch['label'][batch['mask']]):
      case_rows.append(done)
      case_pred.append(_crop(pred_HW, rows[done]['pad']))
      case_label.append(_crop(label_HW, rows[done]['pad']))
      done += 1
      if done == len(rows) or rows[done]['case'] != rows[done - 1]['case']:
        yield case_rows, np.stack(case_pred), np.stack(case_label)
        case_rows, case_pred, case_label = [], [], []


def _crop(array_HW: np.ndarray, pad: Sequence[Sequence[int]]) -> np.ndarray:
  """The slice without the store's zero padding ((top, bottom), (left, right))."""
  (top, bottom), (left, right) = pad
  return np.asarray(array_HW[top:array_HW.shape[0] - bottom, left:array_HW.shape[1] - right])


def keep_largest_component(pred: np.ndarray, num_classes: int) -> np.ndarray:
  """`pred` with each foreground class reduced to its largest face-connected component (as nnU-Net does);
  the voxels removed become background."""
  pred = pred.copy()
  for k in range(1, num_classes):
    components, n = ndimage.label(pred == k)  # the default structure is face connectivity, in 2D or 3D
    if n > 1:
      largest = 1 + np.argmax(np.bincount(components.ravel())[1:])
      pred[(components > 0) & (components != largest)] = 0
  return pred


def _scores(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> dict[str, float | bool]:
  """segmentation_metrics of two masks, and whether both were empty: such a case scores 100 by rule, so
  the report counts them."""
  both_empty = not pred.any() and not label.any()
  return {**metrics.segmentation_metrics(pred, label, spacing), 'both_empty': both_empty}


def volume_metrics(pred: np.ndarray, label: np.ndarray, cartilage: Sequence[bool], spacing: Sequence[float]
                   ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
  """({class: 3D scores}, {class: [2D scores of each slice whose label has cartilage]}) of one volume of
  (slices, H, W) classes with voxel `spacing` (left-right, then in-plane) in mm."""
  per_volume, per_slice = {}, {}
  for name, k in CLASSES.items():
    pred_k, label_k = pred == k, label == k
    per_volume[name] = _scores(pred_k, label_k, spacing)
    per_slice[name] = [_scores(pred_k[i], label_k[i], spacing[1:]) for i in np.flatnonzero(cartilage)]
  return per_volume, per_slice


def _summary(cases: Sequence[dict]) -> dict:
  """Per metric mean/std/n/n_empty over `cases`, and how many of them had both masks empty."""
  return {**{m: metrics.summarize([c[m] for c in cases]) for m in METRICS},
          'n_both_empty': sum(c['both_empty'] for c in cases)}


def _json_ready(value):
  """NaN (a std of one case, a mean of none) as JSON null rather than the non-standard NaN."""
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def _cell(stats: dict) -> str:
  """'mean ± std' of a JSON-ready summary (None where undefined)."""
  if stats['mean'] is None:
    return 'n/a'
  return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats['std'] is not None else '')


def write_report(path: pathlib.Path, summary: dict) -> None:
  """report.md from the JSON-ready summary: Table-1-shaped tables, 3D and 2D, each class beside the paper's
  EAS U-Net row."""
  post = 'on' if summary['largest_component'] else 'off'
  lines = [
      f"# Test-set evaluation of `{summary['name']}`, step {summary['step']}", '',
      f"Checkpoint `{summary['checkpoint_dir']}` (eval.checkpoint = {summary['requested']!r}); "
      f"{summary['num_volumes']} test volumes, {summary['num_cartilage_slices']} slices with cartilage.", '',
      f'Post-processing (largest connected component per class): **{post}**.', '',
      'Mean ± sample std over cases. HD, HD95 and ASSD average the cases where both masks are non-empty; '
      'a case with exactly one empty mask scores Dice, precision and recall 0 and is counted as *empty*; '
      'a case with both empty scores 100 and 0 mm. The paper row is EAS U-Net of its Table 1 (OAI-ZIB, per '
      'cartilage slice, no HD95 or ASSD given).', '']
  spacings = ', '.join(dict.fromkeys(' × '.join(f'{x:g}' for x in s) for s in summary['spacing_mm'].values()))
  titles = {'3d': f'## 3D, per volume (voxel spacing {spacings} mm)',
            '2d': "## 2D, per slice with cartilage (in-plane spacing; the paper's Table 1 protocol)"}
  for protocol, title in titles.items():
    lines += [title, '', '| Cartilage | Model | DSC % | Precision % | Recall % | HD mm | HD95 mm | ASSD mm |',
              '|---|---|---|---|---|---|---|---|']
    for name in CLASSES:
      ours, paper = summary[protocol][name], PAPER_EAS_UNET[name]
      lines += [f'| {name.upper()} | this run | ' + ' | '.join(_cell(ours[m]) for m in METRICS) + ' |',
                f'| {name.upper()} | EAS U-Net (paper) | ' +
                ' | '.join(f'{paper[m]:.2f}' if m in paper else '–' for m in METRICS) + ' |']
    unit = 'volumes' if protocol == '3d' else 'slices'
    counts = '; '.join(f"{name.upper()} {s['dice']['n']} {unit}, {s['hd']['n_empty']} with one mask empty, "
                       f"{s['n_both_empty']} with both empty" for name, s in summary[protocol].items())
    lines += ['', f'Counts: {counts}.', '']
  path.write_text('\n'.join(lines))


def plot_loss_curves(metrics_path: pathlib.Path, out: pathlib.Path) -> None:
  """loss_curves.png: the training and validation losses against step (paper Fig. 8/9)."""
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  # val/loss is the final output's CE + Dice, like train/loss_final; train/loss adds the side outputs.
  curves = (('train/loss', '-', 'train/loss (with side outputs)'),
            ('train/loss_final', '--', 'train/loss_final'), ('val/loss', 'o-', 'val/loss'))
  for key, style, label in curves:
    points = [(r['step'], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), style, label=label, markersize=4)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (cross-entropy + Dice)')
  ax.set_title('Training and validation loss')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def _overlay(image_HW: np.ndarray, classes_HW: np.ndarray) -> np.ndarray:
  """RGB of the grey image with FC and TC tinted in their colours."""
  rgb = np.repeat(image_HW[..., None], 3, axis=-1).astype(np.float32)
  for name, k in CLASSES.items():
    rgb[classes_HW == k] = 0.35 * rgb[classes_HW == k] + 0.65 * np.asarray(_COLOURS[name])
  return np.clip(rgb, 0, 1)


def plot_overlays(samples: Sequence[dict], out: pathlib.Path) -> None:
  """overlays.png: image | label | prediction for each sample slice (paper Fig. 10)."""
  fig, axes = plt.subplots(len(samples), 3, figsize=(9, 3 * len(samples)), dpi=120, squeeze=False)
  for row, s in zip(axes, samples):
    panels = (np.repeat(s['image'][..., None], 3, axis=-1), _overlay(s['image'], s['label']),
              _overlay(s['image'], s['pred']))
    titles = (f"{s['case']} slice {s['slice']}", 'label', 'prediction')
    for ax, panel, title in zip(row, panels, titles):
      # Store slices are (anterior, superior) in RAS order: show superior up and anterior right.
      ax.imshow(np.swapaxes(panel, 0, 1)[::-1], interpolation='nearest')
      ax.set_title(title, fontsize=9)
      ax.axis('off')
  handles = [matplotlib.patches.Patch(color=_COLOURS[n], label=n.upper()) for n in CLASSES]
  fig.legend(handles=handles, loc='lower center', ncol=2, frameon=False)
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(out)
  plt.close(fig)


def score_test_set(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, state: train.TrainState,
                   store_dir: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
  """Predicts every test volume and scores it: {'per_case': [{'case', 'fc', 'tc'}] of 3D scores,
  'slices': {class: [2D scores]}, 'spacing_mm': {case: 3D spacing}, 'samples': slices for the figure}."""
  rows = pipeline.read_index(store_dir / 'test')
  images = np.load(store_dir / 'test' / 'images.npy', mmap_mode='r')
  data_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  predict = jax.jit(functools.partial(_predict_step, graphdef=graphdef),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)
  batch_size = -(-config.eval.batch_size // jax.device_count()) * jax.device_count()
  cartilage_rows = [i for i, row in enumerate(rows) if row['cartilage']]
  figure_rows = {cartilage_rows[int(i)] for i in np.linspace(
      0, len(cartilage_rows) - 1, min(config.eval.num_figure_slices, len(cartilage_rows)))}
  num_volumes = len(dict.fromkeys(row['case'] for row in rows))
  scores = {'per_case': [], 'slices': {n: [] for n in CLASSES}, 'spacing_mm': {}, 'samples': []}
  start = time.monotonic()
  for case_rows, pred, label in predict_volumes(predict, state, store_dir, batch_size, data_sharding):
    case = rows[case_rows[0]]['case']
    if config.eval.largest_component:
      pred = keep_largest_component(pred, config.model.num_classes)
    first = rows[case_rows[0]]
    spacing = scores['spacing_mm'][case] = (first['sagittal_spacing'], *first['spacing'])
    per_volume, per_slice = volume_metrics(pred, label, [rows[r]['cartilage'] for r in case_rows], spacing)
    scores['per_case'].append({'case': case, **per_volume})
    for name in CLASSES:
      scores['slices'][name] += per_slice[name]
    scores['samples'] += [{'case': case, 'slice': rows[r]['slice'], 'pred': pred[i], 'label': label[i],
                           'image': _crop(images[r], rows[r]['pad']).astype(np.float32)}
                          for i, r in enumerate(case_rows) if r in figure_rows]
    done, spent = len(scores['per_case']), time.monotonic() - start
    logging.info('evaluate %d/%d %s: Dice FC %.2f TC %.2f (%.0f s, ETA %.0f s)', done, num_volumes, case,
                 per_volume['fc']['dice'], per_volume['tc']['dice'], spent,
                 spent / done * (num_volumes - done))
  return scores


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """Evaluates the checkpoint `config.eval.checkpoint` of `workdir` on the test split; returns the folder
  `<workdir>/eval/<step>` it wrote metrics.json, per_case.csv, report.md and the figures to."""
  workdir = pathlib.Path(workdir)
  mesh = train.make_mesh()
  step, graphdef, state = restore_state(config, workdir, mesh)
  store_dir = train.prepare_data(config, workdir)
  if not pipeline.read_index(store_dir / 'test'):
    raise ValueError(f'the test split of {store_dir} is empty: set data.split or data.split_file to hold '
                     'test cases')
  scores = score_test_set(config, graphdef, state, store_dir, mesh)

  out = workdir / 'eval' / str(step)
  if jax.process_index() > 0:  # every process scored the whole test set; process 0 writes it
    return out
  out.mkdir(parents=True, exist_ok=True)
  per_case = scores['per_case']
  summary = _json_ready({
      'name': config.name, 'step': step, 'requested': str(config.eval.checkpoint),
      'checkpoint_dir': str(workdir.absolute() / 'checkpoints' / str(step)),
      'largest_component': bool(config.eval.largest_component), 'num_volumes': len(per_case),
      'num_cartilage_slices': len(scores['slices']['fc']),
      'spacing_mm': scores['spacing_mm'],
      '3d': {n: _summary([c[n] for c in per_case]) for n in CLASSES},
      '2d': {n: _summary(scores['slices'][n]) for n in CLASSES},
      'config': json.loads(config.to_json()),
  })
  (out / 'metrics.json').write_text(json.dumps(summary, indent=1))
  with open(out / 'per_case.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['case'] + [f'{n}_{m}' for n in CLASSES for m in METRICS])
    writer.writerows([c['case']] + [c[n][m] for n in CLASSES for m in METRICS] for c in per_case)
  write_report(out / 'report.md', summary)
  if (workdir / 'metrics.jsonl').exists():
    plot_loss_curves(workdir / 'metrics.jsonl', out / 'loss_curves.png')
  else:
    logging.warning('no %s: loss_curves.png not drawn', workdir / 'metrics.jsonl')
  if scores['samples']:
    plot_overlays(scores['samples'], out / 'overlays.png')
  logging.info('evaluation of step %d written to %s: 3D Dice FC %s TC %s', step, out,
               _cell(summary['3d']['fc']['dice']), _cell(summary['3d']['tc']['dice']))
  return out
