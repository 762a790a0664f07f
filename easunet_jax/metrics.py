"""Segmentation metrics: overlap and surface-distance scores of binary masks for evaluation reports, and the
jittable per-class confusion counts (and their Dice) used by validation during training."""

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage


def as_mask(array: ArrayLike, name: str) -> np.ndarray:
  """`array` as a boolean mask: booleans, or numbers all 0 or 1 (a mask read as floats, say). Other values
  (a label map's, probabilities) are a ValueError naming `name`: read as "any non-zero", a label map's
  classes would be scored or measured as one."""
  array = np.asarray(array)
  if array.dtype != bool and (other := (array != 0) & (array != 1)).any():
    raise ValueError(f'{name}: expected a boolean mask (True/False or 0/1), got values such as '
                     f'{np.unique(array[other])[:4].tolist()}; pass one class of a label map, e.g. '
                     'labels == 2')
  return array.astype(bool, copy=False)


def check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
  """`spacing` as `ndim` voxel sizes in mm, each positive: a negative one (an affine's diagonal entry of an
  LPS file) or 0 would give distances and volumes in no unit, so it is a ValueError."""
  sizes = np.ravel(np.asarray(spacing, float))
  if len(sizes) != ndim or not np.all(np.isfinite(sizes) & (sizes > 0)):
    raise ValueError(f'spacing: expected {ndim} positive voxel sizes in mm, one per axis, got {spacing!r} '
                     "(nibabel's header.get_zooms() gives them)")
  return tuple(sizes.tolist())


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of `mask` with at least one face neighbour outside it; outside the array counts as outside."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  # border_value=0: a mask touching the array border has its border voxels on its surface.
  return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
  """The smallest box holding every voxel of a non-empty `mask`."""
  box = []
  for axis in range(mask.ndim):
    # Projections instead of np.nonzero: no index arrays for the whole mask.
    present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(int(present[0]), int(present[-1]) + 1))
  return tuple(box)


def _directed_distances(surface_from: np.ndarray, surface_to: np.ndarray,
                        spacing: Sequence[float]) -> np.ndarray:
  """For each voxel of `surface_from`, the distance in mm to the nearest voxel of `surface_to`."""
  # The Euclidean feature transform (the nearest surface_to voxel in the spacing's metric) read at the
  # surface_from voxels only: the full distance map is another float64 pass over the box, almost all unread.
  nearest = ndimage.distance_transform_edt(~surface_to, sampling=spacing, return_distances=False,
                                           return_indices=True)
  points = np.nonzero(surface_from)
  offsets_mm = (nearest[(slice(None), *points)] - np.stack(points)) * np.asarray(spacing)[:, None]
  return np.sqrt(np.sum(offsets_mm ** 2, axis=0))


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
  """Dice, precision, recall (%) and HD, HD95, ASSD (mm) of boolean masks `pred` and `gt` (2D or 3D).

  `spacing` is the voxel size in mm, one entry per axis. Surfaces are the mask minus its erosion by the
  face-connected structuring element; a mask's voxels on the array border are surface voxels. HD is the
  largest of the directed surface distances pred -> gt and gt -> pred, HD95 the 95th percentile (linear
  interpolation) and ASSD the mean of both directed sets taken together.

  Empty masks:

  | pred  | gt    | dice | precision | recall | hd, hd95, assd |
  |-------|-------|------|-----------|--------|----------------|
  | empty | empty | 100  | 100       | 100    | 0              |
  | empty | some  | 0    | 0         | 0      | NaN            |
  | some  | empty | 0    | 0         | 0      | NaN            |

  An undefined ratio (0/0) is 0 when exactly one mask is empty: the case is a failure, as its Dice says, and
  swapping pred and gt swaps precision and recall, as it does for non-empty masks. NaN distances are meant to
  be left out of means and counted as "empty" beside them (see `summarize`).
  """
  pred, gt = as_mask(pred, 'pred'), as_mask(gt, 'gt')
  if pred.shape != gt.shape:
    raise ValueError(f'pred {pred.shape} and gt {gt.shape} must have one shape')
  spacing = check_spacing(spacing, pred.ndim)
  pred_any, gt_any = bool(pred.any()), bool(gt.any())
  if not pred_any and not gt_any:
    return {'dice': 100.0, 'precision': 100.0, 'recall': 100.0, 'hd': 0.0, 'hd95': 0.0, 'assd': 0.0}
  if not pred_any or not gt_any:
    return {'dice': 0.0, 'precision': 0.0, 'recall': 0.0, 'hd': np.nan, 'hd95': np.nan, 'assd': np.nan}
  # Cropping to the bounding box of pred | gt changes no result: every voxel just outside it is background,
  # which is what the erosion's border_value=0 assumes, and every surface voxel lies inside it. It makes the
  # distance transforms of thin cartilage in a full volume affordable.
  box = bounding_box(pred | gt)
  pred, gt = pred[box], gt[box]
  n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
  tp = int(np.count_nonzero(pred & gt))
  surface_pred, surface_gt = _surface(pred), _surface(gt)
  distances = np.concatenate([_directed_distances(surface_pred, surface_gt, spacing),
                              _directed_distances(surface_gt, surface_pred, spacing)])
  return {'dice': 200.0 * tp / (n_pred + n_gt), 'precision': 100.0 * tp / n_pred,
          'recall': 100.0 * tp / n_gt, 'hd': float(distances.max()),
          'hd95': float(np.percentile(distances, 95)), 'assd': float(distances.mean())}


def summarize(values: Sequence[float]) -> dict[str, float | int]:
  """Mean and sample standard deviation (ddof=1) of the non-NaN `values`; `n` of them, `n_empty` NaNs.

  The mean is NaN with no values, the std NaN with fewer than two (a spread needs two cases).
  """
  values = np.asarray(values, dtype=np.float64)
  finite = values[~np.isnan(values)]
  return {'mean': float(finite.mean()) if finite.size else np.nan,
          'std': float(finite.std(ddof=1)) if finite.size > 1 else np.nan,
          'n': int(finite.size), 'n_empty': int(values.size - finite.size)}


def nan_as_null(value: Any) -> Any:
  """`value` with each NaN in it (in nested dicts, lists and tuples) as None, which json.dumps writes as
  JSON's null where it would write the non-standard NaN (a std of one case, a plate's thickness where it is
  empty)."""
  if isinstance(value, dict):
    return {k: nan_as_null(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [nan_as_null(v) for v in value]
  if isinstance(value, float | np.floating) and np.isnan(value):
    return None
  return value


def mean_std_text(mean: float | None, std: float | None) -> str:
  """'mean ± std' to two decimals for report tables; 'n/a' without a mean, the mean alone without a spread
  (None, as metrics.json writes them, or NaN: undefined)."""
  def undefined(value: float | None) -> bool:
    return value is None or math.isnan(value)

  if undefined(mean):
    return 'n/a'
  return f'{mean:.2f}' + ('' if undefined(std) else f' ± {std:.2f}')


def confusion_counts(pred_BHW: jax.Array, label_BHW: jax.Array, num_classes: int) -> jax.Array:
  """Per-sample (TP, FP, FN) of each foreground class, (B, num_classes - 1, 3), summed over non-batch axes."""
  classes = jnp.arange(1, num_classes)
  pred_k, label_k = pred_BHW[..., None] == classes, label_BHW[..., None] == classes
  axes = tuple(range(1, pred_BHW.ndim))
  return jnp.stack([jnp.sum(pred_k & label_k, axis=axes), jnp.sum(pred_k & ~label_k, axis=axes),
                    jnp.sum(~pred_k & label_k, axis=axes)], axis=-1)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
  """Dice (fraction) of (..., 3) TP/FP/FN counts; 1 where prediction and label are both empty."""
  tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
  denominator = 2 * tp + fp + fn
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
