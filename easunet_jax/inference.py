"""The network over whole volumes: sagittal slices normalised, resampled to the network's pixel and padded
to its stride, batched through the eval-mode network on a mesh (compiled once per slice shape), and the
class probabilities resampled back to the volume's grid, averaged over sub-pixel grids and smoothed across
slices."""

import functools
import hashlib
import itertools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from scipy import ndimage

from easunet_jax import models, parallel, steps
from easunet_jax.data import pipeline, preprocess
from easunet_jax.errors import CheckpointError
from easunet_jax.progress import EVERY_S, Progress

# Network pixels per in-plane axis a resampled slice may span: outside, the header's voxel size is wrong
# (another unit than mm, a scaled affine), and the slice would be a few pixels or exhaust memory.
_SLICE_PIXELS = (16, 4096)
# The compiled forward passes of this process's Networks, by all the program depends on (network, weights'
# shapes and shardings, slice shape), the last used last: a notebook's next `predict.predict` of the same
# model compiles nothing (1.5-2 s of the shipped model's 5 s on a small scan). A few: each holds its
# executable.
_PROGRAMS: dict[tuple, jax.stages.Compiled] = {}
_PROGRAMS_KEPT = 8


def _probabilities(state: steps.TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef
                   ) -> tuple[jax.Array, jax.Array]:
  """Softmax (B, H, W, K), and whether all the logits were finite. No flip test-time augmentation: a
  head-foot flip makes the femur a tibia, and a model trained without flips segments flipped knees badly
  (flip TTA cut the 6000-step shipped model's 3D Dice on the DESS-like transfer set from 75 / 77 to 53 / 13,
  FC / TC)."""
  logits, finite = steps.forward_checked(state, image_BHW1, graphdef=graphdef)
  return jax.nn.softmax(logits, axis=-1), finite


@functools.partial(jax.jit, static_argnames='axis')
def _interpolate(array: jax.Array, first: jax.Array, weight: jax.Array, axis: int) -> jax.Array:
  """`array` linearly interpolated along `axis` between its entries `first` and `first` + 1 (the last entry
  repeated past the end) by `weight`: one fused loop where numpy made five volume-sized arrays per axis, the
  time a prediction spends outside the network cut to less than half (docs/performance.md)."""
  weight = weight.reshape([-1 if a == axis else 1 for a in range(array.ndim)])
  below = jnp.take(array, first, axis, mode='clip')
  return below + weight * (jnp.take(array, first + 1, axis, mode='clip') - below)


def _resize(array: np.ndarray, size: Sequence[int], offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
  """`array` (S, H, W, ...) with each sagittal slice linearly resampled to `size` (H', W'), one in-plane axis
  at a time. Pixel edges map onto pixel edges (the field of view is kept; scipy's zoom with grid_mode), the
  grid moved by `offset` input pixels per axis, and the edge pixels extend outwards."""
  for axis, n_out, shift in zip((1, 2), size, offset):
    n_in = array.shape[axis]
    if n_in == n_out and shift == 0:
      continue
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5 + shift, 0, n_in - 1)
    first = np.floor(x).astype(np.int32)
    array = _interpolate(array, first, (x - first).astype(np.float32), axis=axis)
  return np.asarray(array)


class Network:
  """The eval-mode network over a mesh, slice-batched, compiled once per padded slice shape in a process
  (`_PROGRAMS`); it keeps the time spent in forward passes and in compiling for the timing line."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, state: steps.TrainState,
               mesh: jax.sharding.Mesh):
    self.state = state
    self.stride = models.stride(config.model.features)
    self.batch_size = parallel.round_to_devices(config.predict.batch_size, mesh)
    self.data_sharding, replicated = parallel.shardings(mesh)
    self._jitted = jax.jit(functools.partial(_probabilities, graphdef=graphdef),
                           in_shardings=(replicated, self.data_sharding))
    self._program_key = (graphdef, jax.tree.structure(state), self.data_sharding,
                         tuple((np.shape(x), jnp.result_type(x), getattr(x, 'sharding', None))
                               for x in jax.tree.leaves(state)))
    self.forward_s = self.compile_s = 0.0

  def weights_sha256(self) -> str:
    """A digest of the parameters and batch statistics: the same digest, the same masks."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get((self.state.params, self.state.batch_stats))):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()

  def __call__(self, image_SHW: np.ndarray) -> np.ndarray:
    """Class probabilities (S, H, W, K) of slices whose H and W are multiples of the network's stride; a
    CheckpointError where the network's outputs are not finite (`steps.NOT_FINITE`)."""
    shape = (self.batch_size, *image_SHW.shape[1:], 1)
    key = (*self._program_key, shape)
    program = _PROGRAMS.pop(key, None)
    if program is None:
      start = time.perf_counter()
      spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.data_sharding)
      # XLA's default backend optimisation, whatever XLA_FLAGS say: a volume runs the program over many
      # batches (the test suite turns it off to compile faster, which made these forward passes 2.6x slower).
      program = self._jitted.lower(self.state, spec).compile({'xla_backend_optimization_level': 3})
      self.compile_s += time.perf_counter() - start
    _PROGRAMS[key] = program  # the last used last
    if len(_PROGRAMS) > _PROGRAMS_KEPT:
      del _PROGRAMS[next(iter(_PROGRAMS))]
    out = []
    for first in range(0, len(image_SHW), self.batch_size):
      chunk = image_SHW[first:first + self.batch_size]
      batch = np.zeros(shape, np.float32)  # the last batch is zero-filled to the compiled shape
      batch[:len(chunk), ..., 0] = chunk
      batch = pipeline.put_on_mesh({'image': batch}, self.data_sharding)['image']
      start = time.perf_counter()
      probs, finite = jax.block_until_ready(program(self.state, batch))
      self.forward_s += time.perf_counter() - start
      if not finite:  # else empty masks, as of a scan without cartilage
        raise CheckpointError(f'{steps.NOT_FINITE}: its weights diverged in training (or the model file is '
                              'damaged); use an earlier checkpoint or another model')
      out.append(np.asarray(probs)[:len(chunk)])
    return np.concatenate(out)


def resampled_size(size: Sequence[int], spacing: Sequence[float], pixel: Sequence[float]) -> tuple[int, ...]:
  """In-plane size of a slice of `size` pixels of `spacing` mm resampled to `pixel` mm."""
  return tuple(max(1, round(n * s / p)) for n, s, p in zip(size, spacing, pixel))


def slices_fit(shape: Sequence[int], spacing: Sequence[float], pixel: tuple[float, float] | None) -> bool:
  """Whether sagittal slices of `shape` (H, W) pixels of `spacing` (mm) resample to _SLICE_PIXELS."""
  size = shape if pixel is None else resampled_size(shape, spacing, pixel)
  return all(_SLICE_PIXELS[0] <= n <= _SLICE_PIXELS[1] for n in size)


def class_probabilities(network: Network, image: np.ndarray,
                        spacing: Sequence[float], pixel: tuple[float, float] | None, subpixel_tta: bool,
                        slice_sigma_mm: float, name: str = '') -> np.ndarray:
  """Class probabilities (S, H, W, K) of a canonical-order volume: normalised like the slice store, each
  sagittal slice resampled to `pixel` mm (None: kept) and padded to multiples of the network's stride. The
  network's probabilities are resampled back with linear interpolation, which gives smoother boundaries
  than resampling a label map. With `subpixel_tta` they are the mean over the sampling grids offset by half
  a network pixel along each in-plane axis where the network's pixels are the coarser (four grids at most):
  boundaries finer than the network's pixels. Then they are smoothed across sagittal slices by a Gaussian
  of `slice_sigma_mm` (0: not at all): the network sees one slice at a time, and the smoothing lets
  neighbouring slices outvote a slice's lone speck or gap. With a `name`, a status line with the ETA of the
  scan so named is logged every `progress.EVERY_S` seconds."""
  original = image.shape[1:]
  size = original if pixel is None else resampled_size(original, spacing[1:], pixel)
  image = preprocess.normalise(image).astype(np.float32)
  pad = [(0, 0), *(preprocess.centred_padding(n, preprocess.padded_size(n, network.stride)) for n in size)]
  crop = (slice(None), *(slice(before, before + n) for (before, _), n in zip(pad[1:], size)))

  def probabilities(offset: tuple[float, float]) -> np.ndarray:  # offset in network pixels
    slices = np.pad(_resize(image, size, [o * n / m for o, n, m in zip(offset, original, size)]), pad)
    probs = []
    for first in range(0, len(slices), network.batch_size):  # the network's own batches, counted
      probs.append(network(slices[first:first + network.batch_size]))
      progress.update(progress.done + len(probs[-1]))
      if name and progress.due(EVERY_S):
        logging.info('%s', progress.status(f'{name}: slices segmented{grids}'))
    return _resize(np.concatenate(probs)[crop], original, [-o for o in offset])

  offsets = list(itertools.product(*[(0.0, 0.5) if subpixel_tta and m < n else (0.0,)
                                     for n, m in zip(original, size)]))
  progress = Progress(len(offsets) * len(image))
  grids = f' ({len(offsets)} sampling grids each)' if len(offsets) > 1 else ''  # counted in the progress
  mean = sum(probabilities(offset) for offset in offsets) / len(offsets)
  if slice_sigma_mm > 0:
    mean = ndimage.gaussian_filter1d(mean, slice_sigma_mm / spacing[0], axis=0, mode='nearest')
  return mean
