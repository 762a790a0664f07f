"""Test-set evaluation of a trained checkpoint: per-volume (3D) and per-slice (2D) metrics of FC and TC, the
error of mean thickness and volume per plate and compartment, a Table-1-shaped report beside the paper's
numbers, loss curves, prediction overlays and a Bland-Altman plot of thickness; the same scores of any mask
against its scan's expert labels (for predict --labels)."""

import contextlib
import csv
import errno
import functools
import json
import pathlib
import shutil
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from scipy import ndimage

from easunet_jax import atomic, figures, measures, metric_writer, metrics, parallel, steps
from easunet_jax.data import pipeline, preprocess, volumes
from easunet_jax.data.volumes import CLASSES
from easunet_jax.errors import CheckpointError, DataError
from easunet_jax.progress import Progress

METRICS = ('dice', 'precision', 'recall', 'hd', 'hd95', 'assd')
# Paper Table 1, EAS U-Net (OAI-ZIB, 2D per cartilage slice); it reports no HD95 or ASSD.
PAPER_EAS_UNET = {'fc': {'dice': 90.37, 'precision': 91.69, 'recall': 90.27, 'hd': 6.34},
                  'tc': {'dice': 89.90, 'precision': 89.09, 'recall': 90.37, 'hd': 4.34}}


def _predict_step(state: steps.TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef
                  ) -> tuple[jax.Array, jax.Array]:
  """The classes of a batch, and whether all the logits were finite."""
  logits, finite = steps.forward_checked(state, image_BHW1, graphdef=graphdef)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8), finite


def predict_volumes(predict: Callable, state: steps.TrainState, test: pipeline.Split, batch_size: int,
                    data_sharding: NamedSharding) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
  """(store rows, predicted classes, label classes) of each volume of the split `test` in store order, the
  slices cropped to the source's in-plane size and stacked into (slices, H, W); one volume is held at a
  time. `predict` (`_predict_step` jitted) gives a batch's classes and whether its logits were finite; a
  batch whose logits were not is a CheckpointError (diverged weights)."""
  rows = test.index
  done, case_rows, case_pred, case_label = 0, [], [], []
  for batch in pipeline.eval_batches(test, batch_size):
    image = pipeline.put_on_mesh({'image': batch['image']}, data_sharding)['image']
    pred_BHW, finite = jax.device_get(predict(state, image))
    if not finite:  # argmax would make them background, scored as a model that found no cartilage
      raise CheckpointError(f'{steps.NOT_FINITE} on the slices of case '
                            f'{rows[done]["case"]}: its weights diverged in training; evaluate an earlier '
                            'checkpoint (eval.checkpoint=<step>)')
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


MORPHOMETRY = ('thickness_error_mm', 'thickness_abs_error_mm', 'volume_error_pct', 'volume_abs_error_pct')


def morphometry_errors(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> dict[str, dict]:
  """{region: truth and prediction of mean thickness (mm) and volume (mm^3), and the signed (prediction -
  truth) and absolute errors of thickness (mm) and of volume (% of the truth's)} for 'fc', 'tc' and their
  compartments. Where the truth's region is empty (a small test volume's), its thickness and every error are
  NaN, which the summaries and the Bland-Altman plot leave out; so are the thickness and its errors where
  the prediction's is (a missed region has no thickness; its volume error of -100 % tells the miss). The
  compartments are the ground truth's, applied to both masks, so that both measure the same region; the
  store keeps no laterality, so sides are the patient's left and right."""
  truth_plates = (label == CLASSES['fc'], label == CLASSES['tc'])
  regions = measures.compartment_regions(*truth_plates, spacing, measures.side_names(None))
  truth, _ = measures.compartment_table(*truth_plates, spacing, regions)
  found, _ = measures.compartment_table(pred == CLASSES['fc'], pred == CLASSES['tc'], spacing, regions)
  errors = {}
  for region, true in truth.items():
    true_thickness = true['thickness_mean_mm']
    thickness = found[region]['thickness_mean_mm'] - true_thickness
    volume = (100 * (found[region]['volume_mm3'] / true['volume_mm3'] - 1) if true['volume_mm3']
              else float('nan'))
    errors[region] = {'thickness_true_mm': true_thickness,
                      'thickness_pred_mm': found[region]['thickness_mean_mm'],
                      'volume_true_mm3': true['volume_mm3'], 'volume_pred_mm3': found[region]['volume_mm3'],
                      'thickness_error_mm': thickness, 'thickness_abs_error_mm': abs(thickness),
                      'volume_error_pct': volume, 'volume_abs_error_pct': abs(volume)}
  return errors


def label_scores(classes: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, dict]:
  """{plate: scores of predicted `classes` against the expert labels' `truth` (training classes, same
  canonical grid)}, as `--mode=evaluate` scores a test volume: 3D Dice, precision, recall (%) and HD, HD95,
  ASSD (mm) (`volume_metrics`), the mean 2D Dice over the sagittal slices whose labels hold
  cartilage (the paper's protocol), and mean thickness and volume of both with their errors
  (`morphometry_errors`)."""
  per_volume, per_slice = volume_metrics(classes, truth, truth.any(axis=(1, 2)), spacing)
  errors = morphometry_errors(classes, truth, spacing)
  return {name: {**per_volume[name], **errors[name],
                 'dice_2d': metrics.summarize([s['dice'] for s in per_slice[name]])['mean']}
          for name in CLASSES}


def _summary(cases: Sequence[dict]) -> dict:
  """Per metric mean/std/n/n_empty over `cases`, and how many of them had both masks empty."""
  return {**{m: metrics.summarize([c[m] for c in cases]) for m in METRICS},
          'n_both_empty': sum(c['both_empty'] for c in cases)}


def _cell(stats: dict) -> str:
  return metrics.mean_std_text(stats['mean'], stats['std'])


def write_report(path: pathlib.Path, summary: dict) -> None:
  """report.md from the JSON-ready summary: Table-1-shaped tables, 3D and 2D, each class beside the paper's
  EAS U-Net row."""
  post = 'on' if summary['largest_component'] else 'off'
  lines = [
      f"# Test-set evaluation of `{summary['name']}`, step {summary['step']}", '',
      f"Checkpoint `{summary['checkpoint_dir']}` (eval.checkpoint = {summary['requested']!r}); "
      f"{summary['num_volumes']} test volumes, {summary['num_cartilage_slices']} slices with cartilage.", '',
      f'Post-processing (largest connected component per class): **{post}**.', '',
      'Mean ± sample std over cases. A case with exactly one empty mask scores Dice, precision and recall 0, '
      'has no HD, HD95 or ASSD (their means leave it out) and is counted as *empty*; a case with both masks '
      'empty scores 100 and 0 mm, and counts in every mean. The paper row is EAS U-Net of its Table 1 '
      '(OAI-ZIB, per cartilage slice, no HD95 or ASSD given).', '']
  if summary['synthetic_images']:
    lines += [f"**{summary['synthetic_images']} of the {summary['num_volumes']} test volumes have no image "
              '(label maps alone): they are scored on images synthesised from their label maps (one draw '
              'per case), not on scans.**', '']
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
  lines += ['## Thickness and volume against the ground truth, per plate and compartment', '',
            'Mean ± sample std over test volumes of prediction - truth (signed) and its absolute value; '
            'mean 3D local thickness (`measures.thickness_map_mm`), volume in % of the '
            "truth's. Compartments are the ground truth's (patient's left and right sides; trochlea). "
            'Bland-Altman plot of thickness: `bland_altman_thickness.png`.', '',
            '| Region | Thickness error mm | Abs. thickness error mm | Volume error % | Abs. volume error % '
            '|',
            '|---|---|---|---|---|']
  for region, stats in summary['morphometry'].items():
    lines.append(f'| {region} | ' + ' | '.join(_cell(stats[m]) for m in MORPHOMETRY) + ' |')
  path.write_text('\n'.join(lines + ['']))


def figure_slices(rows: Sequence[dict], count: int) -> set[int]:
  """`count` rows of the test store's index (`pipeline.read_index`) for the overlay figure, shared among
  the cases in turn, each case's at the centres of equal parts of its slices with cartilage: its plates'
  middle, not the edge slices where cartilage is a sliver."""
  by_case: dict[str, list[int]] = {}
  for i, row in enumerate(rows):
    if row['cartilage']:
      by_case.setdefault(row['case'], []).append(i)
  chosen = set()
  for n, case_rows in enumerate(by_case.values()):
    share = min(count // len(by_case) + (n < count % len(by_case)), len(case_rows))
    chosen |= {case_rows[int((j + 0.5) * len(case_rows) / share)] for j in range(share)}
  return chosen


def score_test_set(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, state: steps.TrainState,
                   test: pipeline.Split, mesh: jax.sharding.Mesh) -> dict:
  """Predicts every test volume and scores it: {'per_case': [{'case', 'fc', 'tc'}] of 3D scores,
  'slices': {class: [2D scores]}, 'spacing_mm': {case: 3D spacing}, 'samples': slices for the figure,
  'morphometry': [{'case', 'regions': `morphometry_errors`}]}."""
  rows, images = test.index, test.images
  data_sharding, replicated = parallel.shardings(mesh)
  predict = jax.jit(functools.partial(_predict_step, graphdef=graphdef),
                    in_shardings=(replicated, data_sharding), out_shardings=replicated)
  batch_size = parallel.round_to_devices(config.eval.batch_size, mesh)
  figure_rows = figure_slices(rows, config.eval.num_figure_slices)
  progress = Progress(len(dict.fromkeys(row['case'] for row in rows)))
  scores = {'per_case': [], 'slices': {n: [] for n in CLASSES}, 'spacing_mm': {}, 'samples': [],
            'morphometry': []}
  pipeline.warn_of_absent_classes(test, 'test')
  for case_rows, pred, label in predict_volumes(predict, state, test, batch_size, data_sharding):
    case = rows[case_rows[0]]['case']
    if config.eval.largest_component:
      pred = keep_largest_component(pred, config.model.num_classes)
    first = rows[case_rows[0]]
    spacing = scores['spacing_mm'][case] = (first['sagittal_spacing'], *first['spacing'])
    per_volume, per_slice = volume_metrics(pred, label, [rows[r]['cartilage'] for r in case_rows], spacing)
    scores['per_case'].append({'case': case, **per_volume})
    scores['morphometry'].append({'case': case, 'regions': morphometry_errors(pred, label, spacing)})
    for name in CLASSES:
      scores['slices'][name] += per_slice[name]
    scores['samples'] += [{'case': case, 'slice': rows[r]['slice'], 'pixel_mm': spacing[1:],
                           'pred': pred[i], 'label': label[i],
                           'image': _crop(images[r], rows[r]['pad']).astype(np.float32)}
                          for i, r in enumerate(case_rows) if r in figure_rows]
    progress.update()
    logging.info('%s: %s Dice FC %.2f %% TC %.2f %%', progress.status('evaluate'), case,
                 per_volume['fc']['dice'], per_volume['tc']['dice'])
  return scores


def _synthetic_test_images(config: ml_collections.ConfigDict, workdir: pathlib.Path, case_ids: Sequence[str]
                           ) -> int:
  """How many of the test cases `case_ids` have no image in the data set: the store synthesised theirs."""
  root, test = preprocess.resolve_data_root(config.data, workdir, config.seed), set(case_ids)
  return sum(case.image is None for case in volumes.discover_cases(root) if case.id in test)


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """Evaluates the checkpoint `config.eval.checkpoint` of `workdir` on the test split; returns the folder
  `<workdir>/eval/<step>` (`<step>-largest_component` with eval.largest_component) it wrote metrics.json,
  per_case.csv, morphometry.csv, report.md and the figures to. The folder is written whole under another
  name and then takes the place of an earlier one, so a stopped evaluation leaves the earlier one as it
  was."""
  workdir = pathlib.Path(workdir)
  mesh = parallel.make_mesh()
  step, graphdef, state = steps.restore_for_inference(config, workdir, mesh, same_split=True)
  with parallel.process_0_first('slice store built'):
    store_dir = preprocess.prepare_data(config, workdir, as_trained=True)
    # Mapped at once: a store that another run on the same data.cache_dir renames into its place later
    # leaves it as it is, and is told (`is_current`) before the scoring.
    test = pipeline.read_split(store_dir, 'test')
  try:
    pipeline.check_trained_on(workdir, store_dir)
  finally:  # a store rebuilt meanwhile is named as such, also where the check took it for another split
    pipeline.check_not_rebuilt(test, store_dir)
  if not test.index:
    raise DataError(f'the test split of {store_dir} is empty: set data.split or data.split_file to hold '
                    'test cases')
  final = workdir / 'eval' / (f'{step}-largest_component' if config.eval.largest_component else str(step))
  # Named by the process: two evaluations of one step at once (two terminals watching a run) each write
  # their own, and the one in place first stays.
  out = workdir / 'eval' / '.partial' / (atomic.mark('') + final.name)
  # Made before the scoring, so that a workdir that cannot be written fails at once (on every process).
  with parallel.process_0_first('evaluation folder made'):
    if jax.process_index() == 0:
      atomic.remove_left_by_dead(out.parent, '')  # left by evaluations killed while writing
      shutil.rmtree(out, ignore_errors=True)  # left by one of this process stopped while writing
      out.mkdir(parents=True)
  scores = score_test_set(config, graphdef, state, test, mesh)
  if jax.process_index() > 0:  # every process scored the whole test set; process 0 writes it
    return final
  per_case, morphometry = scores['per_case'], scores['morphometry']
  summary = metrics.nan_as_null({
      'name': config.name, 'step': step, 'requested': str(config.eval.checkpoint),
      'checkpoint_dir': str(workdir.absolute() / 'checkpoints' / str(step)),
      'largest_component': bool(config.eval.largest_component), 'num_volumes': len(per_case),
      'synthetic_images': _synthetic_test_images(config, workdir, [c['case'] for c in per_case]),
      'num_cartilage_slices': len(scores['slices']['fc']),
      'spacing_mm': scores['spacing_mm'],
      '3d': {n: _summary([c[n] for c in per_case]) for n in CLASSES},
      '2d': {n: _summary(scores['slices'][n]) for n in CLASSES},
      # A case whose truth has no gap between the knee's halves has no compartments (`compartment_regions`).
      'morphometry': {region: {m: metrics.summarize([c['regions'][region][m] for c in morphometry
                                                     if region in c['regions']]) for m in MORPHOMETRY}
                      for region in dict.fromkeys(r for c in morphometry for r in c['regions'])},
      'config': json.loads(config.to_json()),
  })
  (out / 'metrics.json').write_text(json.dumps(summary, indent=1))
  with open(out / 'per_case.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['case'] + [f'{n}_{m}' for n in CLASSES for m in METRICS])
    writer.writerows([c['case']] + [c[n][m] for n in CLASSES for m in METRICS] for c in per_case)
  with open(out / 'morphometry.csv', 'w', newline='') as f:
    columns = list(morphometry[0]['regions']['fc'])
    writer = csv.writer(f)
    writer.writerow(['case', 'region'] + columns)
    writer.writerows([c['case'], region] + list(errors.values())
                     for c in morphometry for region, errors in c['regions'].items())
  compartments = [errors for c in morphometry for region, errors in c['regions'].items()
                  if region not in CLASSES]
  figures.plot_bland_altman([e['thickness_true_mm'] for e in compartments],
                            [e['thickness_pred_mm'] for e in compartments],
                            [region for c in morphometry for region in c['regions'] if region not in CLASSES],
                            'mm', out / 'bland_altman_thickness.png')
  write_report(out / 'report.md', summary)
  if (workdir / 'metrics.jsonl').exists():
    figures.plot_loss_curves(metric_writer.read_rows(workdir / 'metrics.jsonl'), out / 'loss_curves.png')
  else:
    logging.warning('no %s: loss_curves.png not drawn', workdir / 'metrics.jsonl')
  if scores['samples']:
    figures.plot_overlays(scores['samples'], out / 'overlays.png')
  earlier = out.with_name(f'{out.name}.earlier')  # moved aside, not deleted, until the new one is in place
  if final.exists():
    logging.warning('%s held an earlier evaluation of step %d: replaced', final, step)
    shutil.rmtree(earlier, ignore_errors=True)  # one this process left
    with contextlib.suppress(FileNotFoundError):  # another evaluation of the step moved it first
      final.rename(earlier)
  try:
    try:
      out.rename(final)
    except OSError as e:  # another evaluation of the step put its own in place meanwhile: the same scores
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
      logging.warning('%s: written by another evaluation of step %d meanwhile; kept', final, step)
      shutil.rmtree(out)
  except BaseException:
    if earlier.exists() and not final.exists():
      earlier.rename(final)
    raise
  shutil.rmtree(earlier, ignore_errors=True)
  with contextlib.suppress(OSError):  # another evaluation may be writing beside it
    out.parent.rmdir()
  logging.info('evaluation of step %d written to %s: 3D Dice (%%) FC %s TC %s', step, final,
               _cell(summary['3d']['fc']['dice']), _cell(summary['3d']['tc']['dice']))
  return final
