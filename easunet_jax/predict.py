"""Segments new knee MRI volumes (NIfTI, any voxel order and in-plane size) with a trained checkpoint and
writes uint8 cartilage masks in the input's voxel grid, with each cartilage's volume and mean thickness."""

import functools
import pathlib
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import logging
from flax import nnx
from scipy import ndimage

from easunet_jax import measures, models, parallel, pretrained, steps
from easunet_jax.data import pipeline, preprocess, volumes
from easunet_jax.errors import ConfigError, DataError
from easunet_jax.progress import Progress

# Written value of each training class (background, FC, TC).
LABEL_VALUES = {'compact': (0, 1, 2), 'oai-zib': (0, *volumes.OAI_ZIB_CARTILAGE.values())}
_CANONICAL = nib.orientations.axcodes2ornt('RAS')


def _probabilities(state: steps.TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef,
                   tta: bool) -> jax.Array:
  """Softmax (B, H, W, K); with `tta`, the mean of it over the slices as given and flipped along each
  in-plane axis (no left-right flip: that axis is across slices, and knees are not mirror images)."""
  def softmax(image_BHW1: jax.Array) -> jax.Array:
    return jax.nn.softmax(steps.forward(state, image_BHW1, graphdef=graphdef), axis=-1)

  probs = softmax(image_BHW1)
  if tta:
    for axis in (1, 2):
      probs += jnp.flip(softmax(jnp.flip(image_BHW1, axis)), axis)
    probs /= 3
  return probs


def model_pixel_spacing(config: ml_collections.ConfigDict, workdir: pathlib.Path | None
                        ) -> tuple[float, float]:
  """In-plane pixel size (mm) the model was trained at: predict.spacing, or when that is 0 the median of
  the training slice store's rows."""
  if all(s > 0 for s in config.predict.spacing):
    return tuple(float(s) for s in config.predict.spacing)
  split_dir = pathlib.Path(config.data.cache_dir or workdir / 'slices') / 'train'
  if not (split_dir / 'index.json').is_file():
    raise DataError(f'{split_dir / "index.json"} not found: it gives the pixel size the model was '
                    "trained at; pass --config.predict.spacing='(<mm>, <mm>)' or "
                    '--config.predict.resample=False')
  rows = pipeline.read_index(split_dir)
  return tuple(float(statistics.median(row['spacing'][i] for row in rows)) for i in (0, 1))


def _inputs(input_path: str | pathlib.Path, output_path: str | pathlib.Path
            ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(input file, output file) pairs; a directory of inputs gives a directory of outputs of the same names."""
  source, target = pathlib.Path(input_path), pathlib.Path(output_path)
  if source.is_dir():
    files = sorted(p for p in source.iterdir() if p.name.endswith(('.nii.gz', '.nii')) and p.is_file())
    if not files:
      raise DataError(f'{source}: no NIfTI file (*.nii.gz, *.nii) in this directory')
    return [(p, target / p.name) for p in files]
  if not source.is_file():
    raise DataError(f'{source}: no such input file or directory')
  return [(source, target / source.name if target.is_dir() else target)]


def _resize(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """`array` (S, H, W, ...) with each sagittal slice linearly resampled to `size` (H', W'), one in-plane axis
  at a time. Pixel edges map onto pixel edges (the field of view is kept; scipy's zoom with grid_mode) and
  the edge pixels extend outwards; two gathers per axis are several times faster than ndimage.zoom."""
  for axis, n_out in zip((1, 2), size):
    n_in = array.shape[axis]
    if n_in == n_out:
      continue
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    first = np.floor(x).astype(np.intp)
    weight = (x - first).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    below = np.take(array, first, axis)
    array = below + weight * (np.take(array, np.minimum(first + 1, n_in - 1), axis) - below)
  return array


class _Network:
  """The eval-mode network over a mesh, slice-batched, compiled once per padded slice shape; it keeps the
  time spent in forward passes (compilation apart) for the timing line."""

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, state: steps.TrainState,
               mesh: jax.sharding.Mesh):
    self.state = state
    self.stride = models.stride(config.model.features)
    self.batch_size = parallel.round_to_devices(config.predict.batch_size, mesh)
    self.data_sharding, replicated = parallel.shardings(mesh)
    self._jitted = jax.jit(functools.partial(_probabilities, graphdef=graphdef, tta=config.predict.tta),
                           in_shardings=(replicated, self.data_sharding))
    self._compiled = {}
    self.forward_s = self.compile_s = 0.0

  def __call__(self, image_SHW: np.ndarray) -> np.ndarray:
    """Class probabilities (S, H, W, K) of slices whose H and W are multiples of the network's stride."""
    shape = (self.batch_size, *image_SHW.shape[1:], 1)
    if shape not in self._compiled:
      start = time.perf_counter()
      spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.data_sharding)
      self._compiled[shape] = self._jitted.lower(self.state, spec).compile()
      self.compile_s += time.perf_counter() - start
    out = []
    for first in range(0, len(image_SHW), self.batch_size):
      chunk = image_SHW[first:first + self.batch_size]
      batch = np.zeros(shape, np.float32)  # the last batch is zero-filled to the compiled shape
      batch[:len(chunk), ..., 0] = chunk
      batch = pipeline.put_on_mesh({'image': batch}, self.data_sharding)['image']
      start = time.perf_counter()
      probs = jax.block_until_ready(self._compiled[shape](self.state, batch))
      self.forward_s += time.perf_counter() - start
      out.append(np.asarray(probs)[:len(chunk)])
    return np.concatenate(out)


def _segment(network: _Network, image: np.ndarray, spacing: Sequence[float],
             pixel: tuple[float, float] | None) -> np.ndarray:
  """Training classes (uint8) of a canonical-order volume: normalised like the slice store, each sagittal
  slice resampled to `pixel` mm (None: kept) and padded to multiples of the network's stride. The class
  probabilities are resampled back with linear interpolation before the argmax, which gives smoother
  boundaries than resampling the label map."""
  original = image.shape[1:]
  size = original
  if pixel is not None:
    size = tuple(max(1, round(n * s / p)) for n, s, p in zip(original, spacing[1:], pixel))
  image = _resize(preprocess.normalise(image).astype(np.float32), size)
  pad = [(0, 0), *(preprocess.centred_padding(n, preprocess.padded_size(n, network.stride)) for n in size)]
  probs = network(np.pad(image, pad))
  probs = probs[:, pad[1][0]:pad[1][0] + size[0], pad[2][0]:pad[2][0] + size[1]]
  return np.argmax(_resize(probs, original), axis=-1).astype(np.uint8)


def remove_small_components(classes: np.ndarray, spacing: Sequence[float], min_mm3: float) -> np.ndarray:
  """`classes` with every 3D connected component (face-connected) of a cartilage class smaller than
  `min_mm3` set to background: the specks a network leaves on skin or fluid, while both tibial plates,
  whole or fragmented, stay (real plates hold thousands of mm^3). 0 keeps everything."""
  if min_mm3 <= 0:
    return classes
  classes = classes.copy()
  for k in volumes.CLASSES.values():
    components, _ = ndimage.label(classes == k)
    small = np.bincount(components.ravel()) * float(np.prod(spacing)) < min_mm3
    small[0] = False
    classes[small[components]] = 0
  return classes


def _save(path: pathlib.Path, classes: np.ndarray, nii: nib.Nifti1Image) -> None:
  """Writes `classes` (input voxel order) as uint8 NIfTI with the input's affine and header."""
  header = nii.header.copy()
  header.set_data_dtype(np.uint8)
  out = type(nii)(classes, nii.affine, header)
  out.header.set_slope_inter(1, 0)  # the input's intensity scaling must not rescale the labels
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(out, path)


def predict(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None,
            input_path: str | pathlib.Path, output_path: str | pathlib.Path,
            model_file: str | pathlib.Path | None = None) -> list[dict]:
  """Segments one NIfTI file or a directory of them into `output_path` (a file, or a directory of the same
  names) with the checkpoint eval.checkpoint names in `workdir`, or with `model_file` (`pretrained`: then
  config is the file's, `pretrained.config_of`); returns and prints per case the cartilage measures
  (`measures.cartilage_measures`: FC and TC volume and mean thickness, ...), and the seconds spent in all
  and in the network's forward passes."""
  if config.predict.label_values not in LABEL_VALUES:
    raise ConfigError(f'predict.label_values: expected one of {sorted(LABEL_VALUES)}, '
                      f'got {config.predict.label_values!r}')
  values = np.array(LABEL_VALUES[config.predict.label_values], np.uint8)
  pairs = _inputs(input_path, output_path)
  for source, _ in pairs:  # header checks first: a bad file fails before the checkpoint is restored
    volumes.check_headers(volumes.Case(source.name, source, None))
  mesh = parallel.make_mesh()
  if model_file is not None:
    step, graphdef, state = pretrained.load(config, model_file, mesh)
  else:
    workdir = pathlib.Path(workdir)
    step, graphdef, state = steps.restore_for_inference(config, workdir, mesh)
  pixel = model_pixel_spacing(config, workdir) if config.predict.resample else None
  network = _Network(config, graphdef, state, mesh)
  logging.info('predict: step %d of %s, %d volume(s), pixel %s mm, TTA %s', step, model_file or workdir,
               len(pairs),
               'as given' if pixel is None else ' x '.join(f'{p:g}' for p in pixel), config.predict.tta)
  results, progress = [], Progress(len(pairs))
  for source, target in pairs:
    case_start, forward_before, compile_before = time.perf_counter(), network.forward_s, network.compile_s
    image, spacing = volumes.load_image(source)  # closest-canonical order: axis 0 is left-right
    classes = remove_small_components(_segment(network, image, spacing, pixel), spacing,
                                      config.predict.min_component_mm3)
    plates = {name: classes == k for name, k in volumes.CLASSES.items()}
    result = {'input': str(source), 'output': str(target), **measures.cartilage_measures(plates, spacing)}
    nii = nib.load(source)
    back = nib.orientations.ornt_transform(_CANONICAL, nib.io_orientation(nii.affine))
    _save(target, values[nib.orientations.apply_orientation(classes, back)], nii)
    result['compile_s'] = network.compile_s - compile_before
    result['seconds'] = time.perf_counter() - case_start - result['compile_s']
    result['forward_s'] = network.forward_s - forward_before
    results.append(result)
    print(f"{source.name}: FC {result['fc_volume_mm3']:.0f} mm^3, mean thickness "
          f"{result['fc_thickness_mm']:.2f} mm; TC {result['tc_volume_mm3']:.0f} mm^3, mean thickness "
          f"{result['tc_thickness_mm']:.2f} mm -> {target}", flush=True)
    progress.update()
    logging.info('%s: %s in %.1f s (forward passes %.1f s, compilation %.1f s)', progress.status('predict'),
                 source.name, result['seconds'], result['forward_s'], result['compile_s'])
  return results
