"""Training augmentation on the devices, inside the jitted train step: a random rotation, zoom and
translation of each slice (one resample: bilinear for the image, nearest-neighbour for the labels, zeros
outside), then a random gamma and intensity scale of the image; no left-right flip.

The random numbers of a batch come from one key that the train step folds from the run's seed and its step
count, split into one key per row of the global batch: a resumed run draws what an uninterrupted one drew,
and a slice's augmentation does not depend on how many devices share the batch. The host pipeline only
reads, shuffles and batches slices, so the number of CPU cores no longer bounds a GPU's training speed.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


@dataclasses.dataclass(frozen=True)
class Ranges:
  """Each parameter is drawn uniformly from its range, independently per slice."""
  rotate_deg: float = 10.0  # rotation in [-rotate_deg, rotate_deg] degrees about the slice centre
  scale: tuple[float, float] = (0.9, 1.1)  # zoom factor (> 1 enlarges the anatomy)
  shift: float = 0.08  # translation in [-shift, shift] of the slice size, per axis
  gamma: tuple[float, float] = (0.8, 1.25)  # image -> max(image, 0) ** gamma ...
  intensity: tuple[float, float] = (0.9, 1.1)  # ... * intensity


# Model initialisation draws fold_in(key(seed), n) for n = 0, 1, ... (nnx.Rngs): the augmentation folds in
# its own stream first, so that its step-n key is not one of those.
_STREAM = zlib.crc32(b'easunet_jax.augment')


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The augmentation key of one train step of a run seeded `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STREAM), step)


def sample_parameters(key: jax.Array, batch_size: int, ranges: Ranges = Ranges()) -> dict[str, jax.Array]:
  """One draw per slice: {'angle' (radians), 'zoom', 'shift' (B, 2) as fractions of the slice size, 'gamma',
  'intensity'}, each of leading size batch_size."""
  def one(key):
    k_angle, k_zoom, k_shift, k_gamma, k_intensity = jax.random.split(key, 5)
    return {'angle': jnp.deg2rad(jax.random.uniform(k_angle, (), minval=-ranges.rotate_deg,
                                                    maxval=ranges.rotate_deg)),
            'zoom': jax.random.uniform(k_zoom, (), minval=ranges.scale[0], maxval=ranges.scale[1]),
            'shift': jax.random.uniform(k_shift, (2,), minval=-ranges.shift, maxval=ranges.shift),
            'gamma': jax.random.uniform(k_gamma, (), minval=ranges.gamma[0], maxval=ranges.gamma[1]),
            'intensity': jax.random.uniform(k_intensity, (), minval=ranges.intensity[0],
                                            maxval=ranges.intensity[1])}
  return jax.vmap(one)(jax.random.split(key, batch_size))


def _transform(params: dict[str, jax.Array], slices: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """One slice's arrays (H, W) resampled: 'image' bilinearly then given its gamma and intensity, the label
  maps ('label', 'tissue') nearest-neighbour."""
  shape = next(iter(slices.values())).shape
  size = jnp.array(shape, jnp.float32)
  cos, sin = jnp.cos(params['angle']), jnp.sin(params['angle'])
  # Output pixel o samples the input at matrix @ o + offset: rotation and zoom about the centre, then the
  # shift (scipy.ndimage.affine_transform's convention).
  matrix = jnp.array([[cos, -sin], [sin, cos]]) / params['zoom']
  centre = (size - 1) / 2
  offset = centre - matrix @ (centre + params['shift'] * size)
  grid = jnp.stack(jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in shape), indexing='ij'))
  coords = list(jnp.einsum('ij,jhw->ihw', matrix, grid) + offset[:, None, None])
  out = {name: ndimage.map_coordinates(x, coords, order=int(name == 'image'), mode='constant', cval=0)
         for name, x in slices.items()}
  if 'image' in out:
    out['image'] = jnp.maximum(out['image'], 0) ** params['gamma'] * params['intensity']
  return out


def apply(params: dict[str, jax.Array], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch ({'image' (B, H, W, 1) float, 'label' (B, H, W) int, optionally 'tissue' (B, H, W) int,
  ...}) transformed by per-slice `params`; other entries pass through."""
  slices = {name: batch[name] for name in ('label', 'tissue') if name in batch}
  if 'image' in batch:
    slices['image'] = batch['image'][..., 0]
  out = jax.vmap(_transform)(params, slices)
  if 'image' in out:
    out['image'] = out['image'][..., None].astype(batch['image'].dtype)
  return {**batch, **out}


def augment(key: jax.Array, batch: dict[str, jax.Array], ranges: Ranges = Ranges()) -> dict[str, jax.Array]:
  """The batch with freshly drawn augmentation (`sample_parameters` then `apply`)."""
  return apply(sample_parameters(key, batch['label'].shape[0], ranges), batch)
