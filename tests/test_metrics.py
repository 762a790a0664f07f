"""Segmentation metrics against a brute-force reference and hand-computed cases; confusion counts and Dice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from easunet_jax import metrics

KEYS = ('dice', 'precision', 'recall', 'hd', 'hd95', 'assd')


def _expected(*values):
  """The metrics dict of `values` given in KEYS order: dice, precision, recall, hd, hd95, assd."""
  return dict(zip(KEYS, values, strict=True))


def _reference_surface(mask):
  """Mask voxels with a face neighbour outside the mask, found by shifting a zero-padded copy per
  neighbour."""
  padded = np.pad(mask, 1)
  inner = [slice(1, -1)] * mask.ndim
  outside_neighbour = np.zeros_like(mask)
  for axis in range(mask.ndim):
    for step in (-1, 1):
      neighbour = list(inner)
      neighbour[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
      outside_neighbour |= ~padded[tuple(neighbour)]
  return mask & outside_neighbour


def _reference_metrics(pred, gt, spacing):
  """The definitions, computed from surface point clouds in mm and nearest-neighbour queries on a KD-tree."""
  n_pred, n_gt, tp = pred.sum(), gt.sum(), (pred & gt).sum()
  if n_pred == 0 and n_gt == 0:
    return _expected(100, 100, 100, 0, 0, 0)
  if n_pred == 0 or n_gt == 0:
    return _expected(0, 0, 0, np.nan, np.nan, np.nan)
  points_pred = np.argwhere(_reference_surface(pred)) * np.asarray(spacing)
  points_gt = np.argwhere(_reference_surface(gt)) * np.asarray(spacing)
  distances = np.concatenate([cKDTree(points_gt).query(points_pred)[0],
                              cKDTree(points_pred).query(points_gt)[0]])
  return _expected(200 * tp / (n_pred + n_gt), 100 * tp / n_pred, 100 * tp / n_gt, distances.max(),
                   np.percentile(distances, 95), distances.mean())


def _assert_metrics(got, want):
  assert set(got) == set(KEYS)
  for key in KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)


def _masks(shape, spacing, seed):
  """Named random and structured masks of one shape; coordinates in mm for the shapes."""
  rng = np.random.default_rng(seed)
  mm = np.indices(shape) * np.asarray(spacing).reshape(-1, *[1] * len(shape))
  centre = np.asarray(shape) * np.asarray(spacing) / 2
  radius = np.sqrt(np.sum((mm - centre.reshape(-1, *[1] * len(shape))) ** 2, axis=0))
  normal = rng.normal(size=len(shape))
  height = np.tensordot(normal / np.linalg.norm(normal), mm, axes=1)
  one_voxel = np.zeros(shape, bool)
  one_voxel[tuple(rng.integers(0, shape))] = True
  blobs = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
  return {
      'empty': np.zeros(shape, bool),
      'full': np.ones(shape, bool),
      'one_voxel': one_voxel,
      'sparse': rng.random(shape) < 0.05,
      'dense': rng.random(shape) < 0.7,
      'blobs': blobs > 0.1,
      'ball': radius < 3.0,
      'shell': (radius > 2.5) & (radius < 3.5),
      'sheet': np.abs(height - height.mean()) < 0.4,
      'shifted_sheet': np.abs(height - height.mean() - 0.8) < 0.4,
      'border_ball': np.sqrt(np.sum(mm ** 2, axis=0)) < 3.0,  # cut by the array's corner
  }


PAIRS = [('empty', 'empty'), ('empty', 'ball'), ('ball', 'empty'), ('one_voxel', 'one_voxel'),
         ('one_voxel', 'ball'), ('ball', 'one_voxel'), ('sparse', 'dense'), ('blobs', 'ball'),
         ('ball', 'shell'), ('shell', 'sheet'), ('sheet', 'shifted_sheet'), ('full', 'ball'),
         ('border_ball', 'blobs'), ('ball', 'ball')]
GEOMETRIES = {'2d': ((31, 27), (0.36, 0.7)), '3d': ((18, 22, 20), (0.7, 0.36, 0.45))}


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('pred_name,gt_name', PAIRS)
def test_agrees_with_brute_force_reference(geometry, pred_name, gt_name):
  shape, spacing = GEOMETRIES[geometry]
  masks = _masks(shape, spacing, seed=len(shape))
  pred, gt = masks[pred_name], masks[gt_name]
  _assert_metrics(metrics.segmentation_metrics(pred, gt, spacing), _reference_metrics(pred, gt, spacing))


def test_agrees_with_reference_on_small_objects_in_a_large_volume():
  """The crop to the masks' bounding box changes nothing, whether the objects touch the border or not."""
  shape, spacing = (40, 64, 56), (0.7, 0.36, 0.36)
  rng = np.random.default_rng(7)
  for corner in [(0, 0, 0), (30, 20, 11), (33, 56, 48)]:
    box = tuple(slice(c, c + 7) for c in corner)
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    pred[box], gt[box] = rng.random((7, 7, 7)) < 0.5, rng.random((7, 7, 7)) < 0.5
    _assert_metrics(metrics.segmentation_metrics(pred, gt, spacing), _reference_metrics(pred, gt, spacing))


def test_cube_shifted_one_voxel_along_the_07_mm_axis():
  # 4x4x4 cubes, gt at slices 2-5 and pred at 3-6; the other spacings exceed 0.7 so the shift is nearest.
  # Each direction: a 16-voxel end face at 0.7, the 4 interior voxels of the other end face at 0.7 (the
  # other cube's end face), the 36 side voxels at 0: 40 of 112 distances are 0.7.
  gt, pred = np.zeros((9, 8, 8), bool), np.zeros((9, 8, 8), bool)
  gt[2:6, 2:6, 2:6] = True
  pred[3:7, 2:6, 2:6] = True
  got = metrics.segmentation_metrics(pred, gt, (0.7, 1.0, 1.2))
  _assert_metrics(got, _expected(75, 75, 75, 0.7, 0.7, 40 * 0.7 / 112))


def test_sheet_shifted_one_voxel_has_every_distance_equal_to_the_shift():
  gt = np.zeros((6, 10, 12), bool)
  gt[2] = True
  got = metrics.segmentation_metrics(np.roll(gt, 1, axis=0), gt, (0.7, 0.36, 0.36))
  _assert_metrics(got, _expected(0, 0, 0, 0.7, 0.7, 0.7))


@pytest.mark.parametrize('shape,spacing', [((12, 9), (0.36, 0.7)), ((5, 7, 6), (0.7, 0.36, 0.5))])
def test_identical_masks_are_perfect(shape, spacing):
  mask = np.random.default_rng(3).random(shape) < 0.4
  _assert_metrics(metrics.segmentation_metrics(mask, mask, spacing),
                  _expected(100, 100, 100, 0, 0, 0))


def test_disjoint_squares():
  # 2x2 squares three columns apart at 0.5 mm: per direction two voxels at 1.5 mm and two at 2.0 mm.
  gt, pred = np.zeros((4, 8), bool), np.zeros((4, 8), bool)
  gt[0:2, 0:2] = True
  pred[0:2, 4:6] = True
  got = metrics.segmentation_metrics(pred, gt, (1.0, 0.5))
  _assert_metrics(got, _expected(0, 0, 0, 2.0, 2.0, 1.75))


def test_one_voxel_masks_at_a_known_distance():
  gt, pred = np.zeros((6, 7), bool), np.zeros((6, 7), bool)
  gt[1, 1], pred[4, 5] = True, True
  distance = np.hypot(3 * 0.7, 4 * 0.5)  # 2.9 mm
  got = metrics.segmentation_metrics(pred, gt, (0.7, 0.5))
  _assert_metrics(got, _expected(0, 0, 0, distance, distance, distance))


def test_hd95_interpolates_linearly_between_sorted_distances():
  # A 20-voxel row against a one-voxel gt at its start, 1 mm pixels: directed distances 0..19 from the row
  # and 0 from the voxel, 21 values whose 95th percentile sits at index 19 (of 0-based 0..20): 18.
  gt, pred = np.zeros((3, 20), bool), np.zeros((3, 20), bool)
  gt[1, 0] = True
  pred[1, :] = True
  got = metrics.segmentation_metrics(pred, gt, (1.0, 1.0))
  assert got['hd'] == pytest.approx(19.0)
  assert got['hd95'] == pytest.approx(18.0)
  assert got['assd'] == pytest.approx(sum(range(20)) / 21)


@pytest.mark.parametrize('pred_empty,gt_empty,want', [
    (True, True, _expected(100, 100, 100, 0, 0, 0)),
    (True, False, _expected(0, 0, 0, np.nan, np.nan, np.nan)),
    (False, True, _expected(0, 0, 0, np.nan, np.nan, np.nan)),
])
def test_empty_mask_rules(pred_empty, gt_empty, want):
  mask = np.zeros((5, 6, 7), bool)
  mask[1:3, 2:5, 3:6] = True
  pred, gt = (np.zeros_like(mask) if empty else mask for empty in (pred_empty, gt_empty))
  got = metrics.segmentation_metrics(pred, gt, (0.7, 0.36, 0.36))
  _assert_metrics(got, want)
  assert all(isinstance(value, float) for value in got.values())


def test_swapping_pred_and_gt_swaps_precision_and_recall_only():
  masks = _masks((18, 22, 20), (0.7, 0.36, 0.45), seed=5)
  forward = metrics.segmentation_metrics(masks['blobs'], masks['ball'], (0.7, 0.36, 0.45))
  backward = metrics.segmentation_metrics(masks['ball'], masks['blobs'], (0.7, 0.36, 0.45))
  assert forward['precision'] != pytest.approx(forward['recall'])
  swapped = dict(backward, precision=backward['recall'], recall=backward['precision'])
  _assert_metrics(forward, swapped)


def test_mismatched_shapes_or_spacing_raise():
  with pytest.raises(ValueError, match='spacing'):
    metrics.segmentation_metrics(np.ones((3, 4), bool), np.ones((3, 4), bool), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match='shape'):
    metrics.segmentation_metrics(np.ones((3, 4), bool), np.ones((4, 3), bool), (1.0, 1.0))


def test_masks_of_0_and_1_score_as_booleans_and_label_maps_or_bad_spacing_are_refused():
  """A user's masks as uint8 or floats (nibabel's get_fdata) score as booleans; a label map (FC 2 and TC 4
  would score as one class) or probabilities are refused, and so is a voxel size that is not positive (an
  LPS affine's diagonal) or of another count than the axes."""
  gt = np.zeros((4, 9, 9), bool)
  gt[1:3, 2:7, 3:6] = True
  pred = np.roll(gt, 1, axis=1)
  spacing = (2.0, 0.5, 0.5)
  expected = metrics.segmentation_metrics(pred, gt, spacing)
  assert expected['dice'] == pytest.approx(80.0)
  for dtype in (np.uint8, np.float32):
    assert metrics.segmentation_metrics(pred.astype(dtype), gt.astype(dtype), spacing) == expected
  with pytest.raises(ValueError, match=r'^pred: expected a boolean mask \(True/False or 0/1\), got values '
                     r'such as \[2, 4\]; pass one class of a label map, e\.g\. labels == 2$'):
    metrics.segmentation_metrics(np.where(pred, 2, 0) + 4 * np.roll(pred, 2, axis=0), gt, spacing)
  with pytest.raises(ValueError, match=r'^gt: expected a boolean mask .* got values such as \[0\.5\]'):
    metrics.segmentation_metrics(pred, gt * 0.5, spacing)
  for bad in ((-2.0, 0.5, 0.5), (0.0, 0.5, 0.5), (np.nan, 0.5, 0.5), (0.5, 0.5), 0.5):
    with pytest.raises(ValueError, match=r'^spacing: expected 3 positive voxel sizes in mm, one per axis, '):
      metrics.segmentation_metrics(pred, gt, bad)


def test_summarize_leaves_nan_out_and_counts_it():
  assert metrics.summarize([1.0, np.nan, 2.0, 3.0, np.nan]) == {'mean': 2.0, 'std': 1.0, 'n': 3, 'n_empty': 2}
  one = metrics.summarize([4.0])
  assert one['mean'] == 4.0 and np.isnan(one['std']) and (one['n'], one['n_empty']) == (1, 0)
  none = metrics.summarize([np.nan, np.nan])
  assert np.isnan(none['mean']) and np.isnan(none['std']) and (none['n'], none['n_empty']) == (0, 2)


@pytest.mark.parametrize('shape', [(3, 9, 11), (2, 4, 6, 5)])
def test_confusion_counts_match_numpy(shape):
  num_classes = 3
  pred, label = np.random.default_rng(0).integers(0, num_classes, (2, *shape))
  counts = jax.jit(metrics.confusion_counts, static_argnums=2)(pred, label, num_classes)
  assert counts.shape == (shape[0], num_classes - 1, 3)
  pred, label = np.asarray(pred), np.asarray(label)
  for b in range(shape[0]):
    for k in range(1, num_classes):
      p, g = pred[b] == k, label[b] == k
      np.testing.assert_array_equal(counts[b, k - 1], [np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)])


def test_dice_from_counts_of_confusion_counts_and_empty_cases():
  label = jnp.zeros((2, 6, 6), jnp.int32).at[0, 1:4, 1:4].set(1).at[0, 4, :].set(2)
  pred = label.at[0, 1, 1:4].set(0)  # 3 of class 1's 9 pixels missed; class 2 exact; sample 1 all empty
  dice = metrics.dice_from_counts(np.asarray(metrics.confusion_counts(pred, label, 3), np.float64))
  np.testing.assert_allclose(dice, [[2 * 6 / (2 * 6 + 3), 1.0], [1.0, 1.0]], rtol=1e-12)
  np.testing.assert_allclose(metrics.dice_from_counts(np.array([[0, 5, 0], [0, 0, 4], [3, 1, 2]])),
                             [0.0, 0.0, 6 / 9], rtol=1e-12)


def test_mean_std_text_leaves_out_an_undefined_spread_and_says_na_without_a_mean():
  assert metrics.mean_std_text(1.234, 0.5) == '1.23 ± 0.50'
  assert metrics.mean_std_text(1.234, float('nan')) == metrics.mean_std_text(1.234, None) == '1.23'
  assert metrics.mean_std_text(float('nan'), 1.0) == metrics.mean_std_text(None, None) == 'n/a'
