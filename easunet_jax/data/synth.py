"""Contrast synthesis from label maps (SynthSeg's idea; Billot et al., Medical Image Analysis 2023): with
`data.synth` every training image is drawn afresh from its slice's tissue map, on the devices, inside the
train step, so that the network never sees one fixed contrast.

A draw, per slice: each tissue code is split into two sub-regions by a smooth random field; every
sub-region gets a random mean and spread (air stays dark most of the time); the image is blurred with a
random anisotropic Gaussian (partial volume, lower in-plane resolution), multiplied by a smooth random bias
field, given a random gamma and Rician noise, and scaled like the slice store's normalisation with a random
saturation. Means drawn uniform and independent per sub-region give every contrast and its inverse equally
often, so no inversion step is needed. The tissue maps come from the phantoms (`phantom` and
`knee` write them) or, for label maps alone (bone and cartilage), from `tissues_from_labels`: the labels
plus cortical rims and distance bands of the background.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from easunet_jax.data import phantom

NUM_TISSUES = 24  # tissue codes a map may hold (0 .. NUM_TISSUES - 1): phantom codes and derived ones
# Codes of `tissues_from_labels` beyond the phantoms': background bands by distance to the labelled
# structures (mm), and labels other than bone and cartilage.
_BANDS_MM = (1.0, 3.0, 8.0, 20.0)
_FIRST_BAND = 15
_FIRST_OTHER = _FIRST_BAND + len(_BANDS_MM) + 1
_CARTILAGE_TISSUE = {1: phantom.FC, 2: phantom.TC}  # training class -> tissue code
# OAI-ZIB's bone labels (its femoral cartilage is 2): value -> the codes of marrow and cortical rim.
_OAI_ZIB_BONES = {1: (phantom.FEMUR, phantom.FEMUR_PLATE), 3: (phantom.TIBIA, phantom.TIBIA_PLATE)}


@dataclasses.dataclass(frozen=True)
class Ranges:
  """The random draw of one synthetic slice; each value uniform in its range unless said."""
  spread: float = 0.08  # within-sub-region standard deviation, in [0, spread] of the [0, 1] range
  dark_air: float = 0.8  # probability that air (code 0) is drawn in [0, 0.1] rather than like a tissue
  blur_px: float = 1.5  # Gaussian blur sigma per in-plane axis, in [0, blur_px] pixels
  bias: float = 0.35  # log bias field amplitude in [0, bias]
  log_gamma: float = 0.4  # gamma = exp(normal * log_gamma)
  noise: tuple[float, float] = (0.0, 0.06)  # Rician noise sigma, of the [0, 1] range
  saturation: tuple[float, float] = (0.8, 1.25)  # final scale before clipping to [0, 1]


def _smooth_field(key: jax.Array, shape: tuple[int, int], coarse: int = 5) -> jax.Array:
  """A smooth random field (standard deviation about 0.7): a coarse grid of standard normal samples
  upsampled bilinearly, its outer samples on the slice's edge pixels (`jax.image.resize` holds the field
  flat beyond its outer sample centres, half a coarse cell at each edge: straight, axis-aligned region edges
  there)."""
  scale = (jnp.array(shape) - 1) / (coarse - 1)
  return jax.image.scale_and_translate(jax.random.normal(key, (coarse, coarse)), shape, (0, 1), scale,
                                       0.5 - 0.5 * scale, 'linear')


def _blur(image_HW: jax.Array, sigma: jax.Array, axis: int, radius: int = 4) -> jax.Array:
  """Gaussian blur of `sigma` pixels along one axis (edge-padded taps; sigma 0 keeps the image)."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * taps ** 2 / jnp.maximum(sigma, 1e-3) ** 2)
  weights /= weights.sum()
  padded = jnp.pad(image_HW, [(radius, radius) if a == axis else (0, 0) for a in range(2)], mode='edge')
  n = image_HW.shape[axis]
  return sum(w * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i, w in enumerate(weights))


def render(key: jax.Array, tissue_HW: jax.Array, ranges: Ranges = Ranges()) -> jax.Array:
  """One synthetic image (H, W) float32 in [0, 1] of a tissue-code slice."""
  keys = iter(jax.random.split(key, 24))
  shape = tissue_HW.shape
  u = lambda shape=(), lo=0.0, hi=1.0: jax.random.uniform(next(keys), shape, minval=lo, maxval=hi)  # noqa: E731
  # Sub-regions: the field splits each tissue at its own threshold (some tissues stay whole).
  field = _smooth_field(next(keys), shape)
  split = field > u((NUM_TISSUES,), -2.5, 2.5)[tissue_HW]
  region = tissue_HW.astype(jnp.int32) + NUM_TISSUES * split
  means = u((2 * NUM_TISSUES,))
  air = jnp.where(u() < ranges.dark_air, u((2,), 0.0, 0.1), means[jnp.array([0, NUM_TISSUES])])
  means = means.at[jnp.array([0, NUM_TISSUES])].set(air)
  spreads = u((2 * NUM_TISSUES,), 0.0, ranges.spread)
  image = means[region] + spreads[region] * jax.random.normal(next(keys), shape)
  for axis in (0, 1):
    image = _blur(image, u((), 0.0, ranges.blur_px), axis)
  image *= jnp.exp(u((), 0.0, ranges.bias) * _smooth_field(next(keys), shape, 4))
  image = jnp.clip(image / jnp.maximum(image.max(), 1e-6), 0, 1) ** jnp.exp(
      ranges.log_gamma * jax.random.normal(next(keys)))
  sigma = u((), *ranges.noise)
  real = image + sigma * jax.random.normal(next(keys), shape)
  image = jnp.sqrt(real ** 2 + (sigma * jax.random.normal(next(keys), shape)) ** 2)
  return jnp.clip(image * u((), *ranges.saturation), 0, 1)


def render_batch(key: jax.Array, tissue_BHW: jax.Array, ranges: Ranges = Ranges()) -> jax.Array:
  """Synthetic images (B, H, W, 1) of a batch of tissue maps, one key per row of the batch."""
  return jax.vmap(lambda k, t: render(k, t, ranges))(jax.random.split(key, len(tissue_BHW)),
                                                     tissue_BHW)[..., None]


def _ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
  """The voxel offsets nearer than radius_mm to the centre, and at least the six face neighbours (pixels
  coarser than the radius), as a structuring element: an erosion by it always takes the outermost voxels."""
  offsets = np.meshgrid(*[np.arange(-n, n + 1) for n in (max(1, int(radius_mm // s)) for s in spacing)],
                        indexing='ij')
  near = sum((o * s) ** 2 for o, s in zip(offsets, spacing, strict=True)) < radius_mm ** 2
  return near | (sum(np.abs(o) for o in offsets) <= 1)


def _bands(labelled: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
  """Per voxel, how many of `_BANDS_MM` its distance to the nearest labelled voxel exceeds. From the
  nearest voxels (scipy's feature transform) in float32, which on an OAI-ZIB volume (23 M voxels) takes a
  third of the time of scipy's own float64 distances, compared with the squared bands."""
  nearest = ndimage.distance_transform_edt(~labelled, spacing, return_distances=False, return_indices=True)
  squared = np.zeros(labelled.shape, np.float32)
  for axis, (index, step) in enumerate(zip(nearest, spacing, strict=True)):
    index -= np.arange(labelled.shape[axis], dtype=index.dtype).reshape([-1] + [1] * (2 - axis))
    squared += np.square(index).astype(np.float32) * np.float32(step ** 2)
  return sum((squared > np.float32(band ** 2)).astype(np.uint8) for band in _BANDS_MM)


def tissues_from_labels(labels: np.ndarray, spacing: tuple[float, float, float],
                        label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """Tissue codes (uint8) of a label volume without tissue map (canonical order, source label values):
  the values `label_map` makes femoral or tibial cartilage, and in OAI-ZIB's numbering (femoral cartilage
  2, neither 1 nor 3 cartilage) its bones (1, 3), as the phantoms code them, bone rims within 0.8 mm of the
  bone surface (at least one voxel) as cortical plates, other labels as codes of their own, and the
  background in bands of distance to the labelled structures."""
  labels = np.asarray(labels)
  cartilage = {int(source): _CARTILAGE_TISSUE[int(target)] for source, target in label_map
               if int(target) in _CARTILAGE_TISSUE}
  # OAI-ZIB's numbering: femoral cartilage 2, and 1 and 3 no cartilage (SKM-TEA's 1-4 are all cartilage).
  oai_zib = cartilage.get(2) == phantom.FC and not cartilage.keys() & _OAI_ZIB_BONES.keys()
  bones = _OAI_ZIB_BONES if oai_zib else {}
  known = {**{value: marrow for value, (marrow, _) in bones.items()}, **cartilage}
  tissue = np.full(labels.shape, _FIRST_BAND + len(_BANDS_MM), np.uint8)
  labelled = labels > 0
  if labelled.any():
    tissue[:] = _FIRST_BAND + _bands(labelled, spacing)
  others = labelled & ~np.isin(labels, list(known))
  tissue[others] = _FIRST_OTHER + labels[others] % (NUM_TISSUES - _FIRST_OTHER)
  for value, code in known.items():
    tissue[labels == value] = code
  # The rim: bone voxels nearer than `rim` to a voxel outside the bone (the volume's edge is not one),
  # those that an erosion by a ball of that radius removes. A voxel's distance runs to the centre of the
  # nearest outside voxel, half a voxel beyond the surface.
  rim = _ball(phantom.PLATE_MM + min(spacing) / 2, spacing)
  for value, (_, plate) in bones.items():
    bone = labels == value
    if bone.any():
      tissue[bone & ~ndimage.binary_erosion(bone, rim, border_value=1)] = plate
  return tissue
