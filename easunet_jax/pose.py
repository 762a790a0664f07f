"""How a knee lies in its voxels: the in-plane orientations and sagittal rotations of a canonical-order
volume, in words, and the checks that ask the network which of them shows an upright knee."""

import itertools
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from easunet_jax import inference

# The orientation check (`sagittal_orientation`) runs the network on this many central sagittal slices in
# each of the eight in-plane orientations (of each axis taken as left-right, unless _SLICE_AXIS_RATIO says
# otherwise); it overrides the header only where another orientation holds at
# least _ORIENTATION_MARGIN times the header's share of voxels where the network is sure of cartilage, and
# at least _ORIENTATION_FLOOR of all voxels (a network that finds no cartilage anywhere decides nothing).
_ORIENTATION_SLICES = 8
_ORIENTATION_MARGIN = 1.5
_ORIENTATION_FLOOR = 1e-3
# Then, upright, the same slices rotated in the sagittal plane by these angles (degrees), with the same margin
# and floor: a knee scanned flexed or tilted beyond the poses the network learnt (flexion within about 20
# degrees of the reference knee's) loses its tibial plate first.
_ROTATIONS_DEG = (-30.0, -15.0, 15.0, 30.0)
# The check questions the header's left-right axis too (each of the three axes tried as the one the sagittal
# slices are cut across) unless its voxels are over this many times coarser than the other two axes': a
# sagittal scan of slices thicker than its pixels names its left-right axis by its voxels already, while a
# header of isotropic voxels, or of thicker voxels along another axis, may name another axis left-right (an
# array saved in another axis order than its affine says, as numpy's reversed order of an ITK image) or
# belong to a scan acquired in another plane. The search costs 128 more slices through the network.
_SLICE_AXIS_RATIO = 1.2
# Canonical (RAS) axes: their directions each way, and their lines.
_DIRECTIONS = (('right', 'left'), ('anterior', 'posterior'), ('superior', 'inferior'))
_AXIS_LINES = ('left-right', 'anterior-posterior', 'inferior-superior')
# How a canonical-order volume is turned before its sagittal slices meet the network (`orient`): the
# canonical axis taken as left-right, whether the two others swap, whether axis 1 and axis 2 then flip.
Orientation = tuple[int, bool, bool, bool]
HEADER: Orientation = (0, False, False, False)


def orient(array: np.ndarray, orientation: Orientation) -> np.ndarray:
  """`array` (S, H, W, ...) of canonical order in an `orientation`: canonical axis `orientation[0]` made axis
  0 (the other two keep their order), then the two in-plane axes swapped or not, axis 1 flipped or not, axis
  2 flipped or not; `unorient` undoes it."""
  axis, swap, *flips = orientation
  array = np.moveaxis(array, axis, 0)
  if swap:
    array = array.swapaxes(1, 2)
  return array[(slice(None), *(slice(None, None, -1 if flip else 1) for flip in flips))]


def unorient(array: np.ndarray, orientation: Orientation) -> np.ndarray:
  axis, swap, *flips = orientation
  array = array[(slice(None), *(slice(None, None, -1 if flip else 1) for flip in flips))]
  return np.moveaxis(array.swapaxes(1, 2) if swap else array, 0, axis)


def _in_plane_sources(orientation: Orientation) -> list[int]:
  """The canonical axes that an `orient`ed volume's axes 1 and 2 come from."""
  axis, swap = orientation[:2]
  others = [a for a in range(3) if a != axis]
  return others[::-1] if swap else others


def oriented_spacing(spacing: Sequence[float], orientation: Orientation) -> tuple[float, float, float]:
  """The voxel size of a volume of `spacing` (canonical order) `orient`ed."""
  return (spacing[orientation[0]], *(spacing[a] for a in _in_plane_sources(orientation)))


def describe_orientation(orientation: Orientation) -> str:
  """Where the header puts an `orient`ed volume's left-right axis (where it is not the header's), anterior
  and superior, in words."""
  axis, _, *flips = orientation
  moved = [f"its left-right the header's {_AXIS_LINES[axis]}"] if axis else []
  return ', '.join(moved + [f"its {_DIRECTIONS[a][0]} the header's {_DIRECTIONS[source][flip]}"
                            for a, source, flip in zip((1, 2), _in_plane_sources(orientation), flips)])


def rotate_slices(array: np.ndarray, degrees: float, spacing: Sequence[float]) -> np.ndarray:
  """`array` (S, H, W, ...) with each sagittal slice rotated by `degrees` about its centre in millimetres
  (pixels of `spacing[1:]` mm, square or not), linearly interpolated, edges extended;
  `rotate_slices(rotate_slices(a, d, s), -d, s)` is `a` up to the interpolation."""
  if array.ndim > 3:  # a channel at a time: one 4D transform interpolates over 16 corners, twice as slow
    return np.stack([rotate_slices(array[..., k], degrees, spacing) for k in range(array.shape[-1])], -1)
  angle = np.deg2rad(degrees)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  pixel = np.asarray(spacing[1:], float)
  matrix = np.eye(3)
  matrix[1:, 1:] = rotation * pixel[None, :] / pixel[:, None]  # output pixel -> mm -> rotated -> input pixel
  centre = (np.asarray(array.shape, float) - 1) / 2
  return ndimage.affine_transform(array, matrix, offset=centre - matrix @ centre, order=1, mode='nearest')


def _central_slices(image: np.ndarray) -> np.ndarray:
  """_ORIENTATION_SLICES sagittal slices spread over the central half of the left-right axis."""
  central = np.linspace(0.25 * (len(image) - 1), 0.75 * (len(image) - 1), _ORIENTATION_SLICES)
  return image[np.unique(central.round()).astype(int)]


def _sure_shares(network: inference.Network, variants: Sequence[np.ndarray], spacing: Sequence[float],
                 pixel: tuple[float, float] | None) -> np.ndarray:
  """For each of `variants` (slices of one shape), the share of its voxels where the network's cartilage
  probability exceeds 0.9 (one grid, no slice smoothing; one call, so the variants batch together)."""
  probs = inference.class_probabilities(network, np.concatenate(variants), spacing, pixel, False, 0.0)
  return (probs[..., 1:].sum(-1) > 0.9).reshape(len(variants), -1).mean(1)


def _beats(shares: np.ndarray) -> tuple[int, float]:
  """(index, ratio) of the share that beats share 0 (the header's, or no rotation) by _ORIENTATION_MARGIN
  and _ORIENTATION_FLOOR; (0, 1.0) where none does."""
  best = int(np.argmax(shares))
  ratio = shares[best] / shares[0] if shares[0] > 0 else float('inf')
  if best == 0 or ratio < _ORIENTATION_MARGIN or shares[best] < _ORIENTATION_FLOOR:
    return 0, 1.0
  return best, float(ratio)


def surer(ratio: float) -> str:
  """`_beats`' ratio in words: infinite where the header's way (or no rotation) has no sure cartilage."""
  return 'sure of cartilage only' if np.isinf(ratio) else f'{ratio:.1f}x surer of cartilage'


def sagittal_rotation(network: inference.Network, image: np.ndarray, spacing: Sequence[float],
                      pixel: tuple[float, float] | None, upright_share: float) -> tuple[float, float]:
  """(degrees, its ratio to no rotation's) of an upright canonical-order volume whose central slices
  have `upright_share` (`sagittal_orientation`'s, not run again): of no rotation and _ROTATIONS_DEG
  (`rotate_slices`), the one in which the network is surest of cartilage on the central slices, where it
  beats no rotation by _ORIENTATION_MARGIN and _ORIENTATION_FLOOR; else 0."""
  picked = _central_slices(image)
  rotated = [rotate_slices(picked, angle, spacing) for angle in _ROTATIONS_DEG]
  best, ratio = _beats(np.array([upright_share, *_sure_shares(network, rotated, spacing, pixel)]))
  return (0.0, *_ROTATIONS_DEG)[best], ratio


def sagittal_orientation(network: inference.Network, image: np.ndarray, spacing: Sequence[float],
                         pixel: tuple[float, float] | None) -> tuple[Orientation, float, float]:
  """(orientation, its ratio to the header's, its share) of a canonical-order volume: of the eight in-plane
  orientations (`orient`), the one in which the network is surest of cartilage, measured as the share of
  voxels of _ORIENTATION_SLICES central sagittal slices where cartilage's probability exceeds 0.9 (no
  sub-pixel grids, no slice smoothing). A 2D network trained on upright sagittal slices finds the most
  cartilage in an upright knee, so a header that flips or swaps the knee's in-plane axes (an identity
  direction written by a conversion, an array saved in another order than its affine's) shows as an
  orientation far surer than the header's. Unless the header's left-right voxels are over _SLICE_AXIS_RATIO
  times coarser than the others, the eight of each axis taken as left-right (24; slicings whose slices
  that `inference.slices_fit` refuses skipped). HEADER unless another beats it by _ORIENTATION_MARGIN
  and _ORIENTATION_FLOOR."""
  axes = (0,) if spacing[0] > _SLICE_AXIS_RATIO * max(spacing[1:]) else range(3)
  orientations, shares = [], []
  for axis in axes:
    picked = _central_slices(np.moveaxis(image, axis, 0))
    across = oriented_spacing(spacing, (axis, False, False, False))[1:]
    if axis and not inference.slices_fit(picked.shape[1:3], across, pixel):
      continue
    for swap in (False, True):  # one call per slice shape: the four flips of one shape batch together
      of_shape = [(axis, swap, *flips) for flips in itertools.product((False, True), repeat=2)]
      orientations += of_shape
      variants = [orient(picked, (0, *o[1:])) for o in of_shape]
      shares += list(_sure_shares(network, variants, oriented_spacing(spacing, of_shape[0]), pixel))
  best, ratio = _beats(np.array(shares))  # orientations[0] is the header's
  return orientations[best], ratio, shares[best]
