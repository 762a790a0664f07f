"""The figures the reports draw, as PNG files: loss curves, prediction overlays and the Bland-Altman plot of
thickness (evaluation), cartilage thickness maps and sagittal outlines (prediction), Dice bars over seeds
(sweeps)."""

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib.axes
import matplotlib.figure
import matplotlib.patches
import matplotlib.ticker
import numpy as np

from easunet_jax.data.volumes import CLASSES

COLOURS = {'fc': (1.0, 0.25, 0.1), 'tc': (0.1, 0.6, 1.0)}  # overlay colours, far apart for colour-blind eyes


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs) -> tuple[matplotlib.figure.Figure, Any]:
  """A figure of 120 dpi and its axes (`Figure.subplots`), made without pyplot: files only, so no display
  is needed, and the backend and figure list of a program that imports this module stay its own."""
  fig = matplotlib.figure.Figure(figsize=figsize, dpi=120)
  return fig, fig.subplots(*grid, **kwargs)


def _save(fig: matplotlib.figure.Figure, out: pathlib.Path, **layout) -> None:
  fig.tight_layout(**layout)
  fig.savefig(out)


def plot_loss_curves(rows: Sequence[dict], out: pathlib.Path) -> None:
  """loss_curves.png: the training and validation losses of metrics.jsonl's `rows` against step (paper
  Fig. 8/9), and beside them the validation Dice of each class and their mean, as nnU-Net's progress.png
  shows a run's course. A value logged as null (a non-finite one) leaves a gap."""
  fig, (loss_ax, dice_ax) = _subplots(1, 2, figsize=(11, 4), sharex=True)
  # val/loss is the final output's CE + Dice, like train/loss_final; train/loss adds the side outputs.
  curves = ((loss_ax, 'train/loss', '-', 'train/loss (with side outputs)', 1, None),
            (loss_ax, 'train/loss_final', '--', 'train/loss_final', 1, None),
            (loss_ax, 'val/loss', 'o-', 'val/loss', 1, None),
            *((dice_ax, f'val/dice_{name}', 'o-', name.upper(), 100, COLOURS[name]) for name in CLASSES),
            (dice_ax, 'val/dice_mean', 'o--', 'mean', 100, '0.3'))
  for ax, key, style, label, scale, colour in curves:
    points = [(r['step'], np.nan if r[key] is None else scale * r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), style, label=label, markersize=4, color=colour)
  dice_ax.set_ylim(-2, 102)  # a Dice of 0 or 100 off the frame
  for ax, name, title in ((loss_ax, 'loss (cross-entropy + Dice)', 'Training and validation loss'),
                          (dice_ax, 'Dice %', 'Validation Dice (3D, mean over volumes)')):
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if ax.lines:
      ax.legend()
  _save(fig, out)


def _overlay(image_HW: np.ndarray, classes_HW: np.ndarray) -> np.ndarray:
  """RGB of the grey image with FC and TC tinted in their colours."""
  rgb = np.repeat(image_HW[..., None], 3, axis=-1).astype(np.float32)
  for name, k in CLASSES.items():
    rgb[classes_HW == k] = 0.35 * rgb[classes_HW == k] + 0.65 * np.asarray(COLOURS[name])
  return np.clip(rgb, 0, 1)


def _show_sagittal(ax: matplotlib.axes.Axes, panel: np.ndarray, pixel_mm: Sequence[float]) -> None:
  """Draws a sagittal slice `panel` ((anterior, superior, RGB) as slices are in RAS order) superior up and
  anterior right, at its pixels' true aspect."""
  extent = (0, panel.shape[0] * pixel_mm[0], 0, panel.shape[1] * pixel_mm[1])
  ax.imshow(np.swapaxes(panel, 0, 1)[::-1], extent=extent, interpolation='nearest')


def plot_overlays(samples: Sequence[dict], out: pathlib.Path) -> None:
  """overlays.png: image | label | prediction for each sample slice (paper Fig. 10)."""
  fig, axes = _subplots(len(samples), 3, figsize=(9, 3 * len(samples)), squeeze=False)
  for row, s in zip(axes, samples):
    panels = (np.repeat(s['image'][..., None], 3, axis=-1), _overlay(s['image'], s['label']),
              _overlay(s['image'], s['pred']))
    # The store's slices are in RAS order, whatever the file's: numbered from the patient's left.
    titles = (f"{s['case']} slice {s['slice']} from the left", 'label', 'prediction')
    for ax, panel, title in zip(row, panels, titles):
      _show_sagittal(ax, panel, s['pixel_mm'])
      ax.set_title(title, fontsize=9)
      ax.axis('off')
  handles = [matplotlib.patches.Patch(color=COLOURS[n], label=n.upper()) for n in CLASSES]
  fig.legend(handles=handles, loc='lower center', ncol=2, frameon=False)
  _save(fig, out, rect=(0, 0.03, 1, 1))


def dice_bars(rows: Sequence[dict], out: pathlib.Path) -> None:
  """Bars of each variant's 2D Dice, FC and TC side by side, with the std over seeds as error bars; a
  variant per bar pair (two may share a title), labelled by its title."""
  variants = {r['variant']: r['model'] for r in rows}
  row_of = {(r['variant'], r['cartilage']): r for r in rows}
  x = np.arange(len(variants))
  fig, ax = _subplots(figsize=(max(5, 1.4 * len(variants)), 4))
  for offset, cartilage in ((-0.2, 'fc'), (0.2, 'tc')):
    chosen = [row_of[variant, cartilage] for variant in variants]
    ax.bar(x + offset, [r['dice_mean'] for r in chosen], width=0.4, label=cartilage.upper(),
           yerr=[0 if math.isnan(r['dice_std']) else r['dice_std'] for r in chosen], capsize=3)
  ax.set_xticks(x, list(variants.values()), rotation=20, ha='right')
  ax.set_ylabel('DSC % (2D, per cartilage slice)')
  ax.set_title('Test-set Dice, mean ± std over seeds')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  _save(fig, out)


def plot_thickness_maps(thickness: np.ndarray, plates: dict[str, np.ndarray], spacing: Sequence[float],
                        sides: tuple[str, str], title: str, out: pathlib.Path) -> None:
  """<name>.png: the thickest point of each (left-right, anterior) column of the femoral cartilage seen from
  below and of the tibial cartilage seen from above, the way readers look at them, anterior up, on one
  colour scale in mm. `thickness` and `plates` are (S, H, W) in closest-canonical RAS order; `sides` names
  the halves of the lower and the higher axis-0 index (`measures.side_names`)."""
  fig, axes = _subplots(1, 2, figsize=(10, 4.6))
  vmax = max(4.0, float(np.percentile(thickness[thickness > 0], 99))) if thickness.any() else 4.0
  extent = (0, thickness.shape[0] * spacing[0], 0, thickness.shape[1] * spacing[1])
  for ax, (name, view) in zip(axes, (('fc', 'femoral cartilage from below'),
                                     ('tc', 'tibial cartilage from above'))):
    column = np.where(plates[name], thickness, 0).max(axis=2)  # (left-right, anterior)
    shown = np.ma.masked_equal(column.T[::-1], 0)  # rows anterior first, columns the patient's left to right
    named = sides
    if view.endswith('below'):  # seen from below, the patient's right is on the viewer's left
      shown, named = shown[:, ::-1], sides[::-1]
    image = ax.imshow(shown, cmap='viridis', vmin=0, vmax=vmax, extent=extent, interpolation='nearest')
    ax.set_title(view, fontsize=10)
    if not plates[name].any():  # an empty panel says why
      ax.text(0.5, 0.5, 'none found', transform=ax.transAxes, ha='center', va='center')
    ax.set_xlabel(f'{named[0]}  ←  mm  →  {named[1]}')
    ax.set_ylabel('posterior  ←  mm  →  anterior')
  fig.colorbar(image, ax=axes, label='thickness (mm)', shrink=0.85)
  fig.suptitle(title, fontsize=11)
  fig.savefig(out, bbox_inches='tight')


def cartilage_slices(classes: np.ndarray, count: int = 3) -> list[int]:
  """Sagittal slices (axis 0) at the quantiles 1/(count+1) .. count/(count+1) of the cartilage's left-right
  extent, voxel-weighted: through both condyles and the notch of a knee; even quantiles of the volume when
  there is no cartilage. A slice that falls at two quantiles (cartilage in few slices) is given once."""
  weights = (classes > 0).sum(axis=(1, 2)).astype(np.float64)
  if not weights.any():
    weights[:] = 1
  cumulative = np.cumsum(weights) / weights.sum()
  quantiles = np.arange(1, count + 1) / (count + 1)
  return list(dict.fromkeys(int(np.searchsorted(cumulative, q)) for q in quantiles))


def plot_prediction_slices(image: np.ndarray, classes: np.ndarray, spacing: Sequence[float], title: str,
                           out: pathlib.Path, labels: np.ndarray | None = None,
                           slice_numbers: Sequence[int] | None = None) -> None:
  """<name>.png: the sagittal slices of `cartilage_slices`, each as scanned and with the predicted FC and TC
  tinted, superior up and anterior right, at the scan's pixel aspect: whether the plates are outlined, and
  any cartilage marked on skin or fluid, at a glance; with expert `labels` (training classes), a row of them
  tinted alike below. `image`, `classes` and `labels` are (S, H, W) in closest-canonical RAS order; each
  slice is titled by its number in `slice_numbers` (the scan file's voxel index, which a viewer shows), else
  its index in `image`."""
  chosen = cartilage_slices(classes if labels is None else np.maximum(classes, labels))
  low, high = np.percentile(image[chosen], (1, 99.5))
  grey = np.clip((image[chosen] - low) / max(high - low, 1e-6), 0, 1)
  rows = [('scan', None), ('prediction', classes)] + ([] if labels is None else [('labels', labels)])
  fig, axes = _subplots(len(rows), len(chosen), figsize=(4 * len(chosen), 4.2 * len(rows)),
                        squeeze=False)
  for column, x in enumerate(chosen):
    for ax, (name, tinted) in zip(axes[:, column], rows):
      panel = (np.repeat(grey[column, ..., None], 3, axis=-1) if tinted is None
               else _overlay(grey[column], tinted[x]))
      _show_sagittal(ax, panel, spacing[1:])
      ax.set_xticks([])
      ax.set_yticks([])
      if column == 0:
        ax.set_ylabel(name, fontsize=9)
    number = x if slice_numbers is None else slice_numbers[x]
    axes[0, column].set_title(f'sagittal slice {number} of {image.shape[0]}', fontsize=9)
  handles = [matplotlib.patches.Patch(color=COLOURS[n], label=n.upper()) for n in CLASSES]
  fig.legend(handles=handles, loc='lower center', ncol=2, frameon=False)
  fig.suptitle(title, fontsize=11)
  _save(fig, out, rect=(0, 0.03, 1, 1))


def plot_bland_altman(truth: Sequence[float], measured: Sequence[float], groups: Sequence[str],
                      unit: str, out: pathlib.Path) -> None:
  """Bland-Altman plot: the difference measured - truth against their mean, one colour per group (e.g. a
  compartment), with the mean difference (bias) and its 95 % limits of agreement (bias ± 1.96 SD). Pairs
  with a NaN (a region empty in the truth) are left out."""
  truth, measured = np.asarray(truth, float), np.asarray(measured, float)
  kept = np.isfinite(truth) & np.isfinite(measured)
  mean, difference = ((truth + measured) / 2)[kept], (measured - truth)[kept]
  groups = np.asarray(groups)[kept]
  fig, ax = _subplots(figsize=(6, 4.5))
  for group in dict.fromkeys(groups):
    chosen = groups == group
    ax.scatter(mean[chosen], difference[chosen], s=18, label=group)
  if not difference.size:  # a model that found no cartilage: nothing to draw, and said so
    ax.text(0.5, 0.5, 'no region measured in both prediction and ground truth', transform=ax.transAxes,
            ha='center', va='center')
  else:
    bias = difference.mean()
    lines = [(bias, '-', f'bias {bias:+.2f} {unit}')]
    if difference.size > 1:  # limits of agreement need a spread
      sd = difference.std(ddof=1)
      lines += [(bias + 1.96 * sd, '--', f'+1.96 SD {bias + 1.96 * sd:+.2f}'),
                (bias - 1.96 * sd, '--', f'-1.96 SD {bias - 1.96 * sd:+.2f}')]
    for value, style, label in lines:
      ax.axhline(value, color='k', linestyle=style, linewidth=1, label=label)
  ax.set_xlabel(f'mean of prediction and ground truth ({unit})')
  ax.set_ylabel(f'prediction - ground truth ({unit})')
  ax.set_title('Bland-Altman: mean cartilage thickness')
  ax.grid(alpha=0.3)
  if difference.size:
    ax.legend(fontsize=7, loc='best')
  _save(fig, out)
