"""Single-file models: a trained checkpoint exported as one .npz (evaluation weights in float16, batch
statistics in float32, the config, the step and the in-plane pixel size it was trained at), and the shipped
model, `weights/eas_knee.npz`, that `--mode=predict` uses when no --config is given: the recipe
`configs/eas.py:knee`, then fine-tuning stages from it; the README's "The shipped model" gives the
commands that regenerate it.
"""

import json
import pathlib
import zipfile
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from configs import default
from configs.eas import SHIPPED
from easunet_jax import atomic, checkpoints, parallel, records, steps
from easunet_jax.data import pipeline
from easunet_jax.errors import CheckpointError
from easunet_jax.models import abstract_model

# What reading a damaged .npz raises: a bad member (CRC), a cut deflate stream.
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def _named_leaves(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def export(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, output: str | pathlib.Path
           ) -> dict:
  """Writes the checkpoint eval.checkpoint names in `workdir` to `output` (.npz), whole or not at all;
  returns its metadata: the step, the config and the in-plane pixel size it was trained at. A checkpoint of
  diverged weights (not finite, or parameters beyond the file's float16) is a CheckpointError.

  The config stored is the one the workdir's latest training ran with (its `runs.jsonl`), so that a file
  exported under a shorter --config still scores --labels by the label map it learnt; `config` gives its
  predict settings and how the network is computed (`config` is stored whole where the workdir has no
  record)."""
  workdir = pathlib.Path(workdir)
  atomic.remove_left_by_dead(pathlib.Path(output).parent)  # a killed export's half-written file
  step, _, state = steps.restore_for_inference(config, workdir, parallel.make_mesh())
  pixel = list(pipeline.trained_pixel_mm(config, workdir))
  stored = config.to_dict()
  if (trained := records.last_config(workdir)) is not None:
    computed_as = {k: stored['model'][k] for k in checkpoints.COMPUTE_ONLY_FIELDS}
    stored = trained | {'predict': stored['predict'], 'model': trained['model'] | computed_as}
  meta = {'step': int(step), 'config': stored, 'pixel_mm': pixel}
  params = {f'params{k}': np.asarray(v, np.float32) for k, v in _named_leaves(state.params).items()}
  batch_stats = {f'batch_stats{k}': np.asarray(v, np.float32)
                 for k, v in _named_leaves(state.batch_stats).items()}
  # The parameters are stored in float16, the batch statistics in float32.
  for name, value, limit in [(n, v, np.finfo(np.float16).max) for n, v in params.items()] + [
      (n, v, np.inf) for n, v in batch_stats.items()]:
    if not np.all(np.abs(value) <= limit):  # NaN fails it too
      worst = np.abs(value).max()
      what = (f'reach {worst:.3g}, beyond the float16 a model file stores (65504)' if np.isfinite(worst) else
              'hold NaN or infinite values')
      raise CheckpointError(f'{workdir}: step {step}\'s {name} {what}: a diverged training; export an '
                            'earlier checkpoint (eval.checkpoint=<step>)')
  arrays = {name: value.astype(np.float16) for name, value in params.items()} | batch_stats
  # Through a file object: savez would add .npz to a name without it.
  with atomic.replaced(output) as tmp, open(tmp, 'wb') as f:
    np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
  return meta


def read_meta(path: str | pathlib.Path) -> dict:
  """The metadata of a model file (`export`), with a one-line error for a missing or foreign file."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise CheckpointError(f'{path}: a folder, not a model file (the .npz that --mode=export writes from a '
                          "training's workdir)")
  if not path.is_file():
    hint = "; make it with the commands of the README's \"The shipped model\"" if path == SHIPPED else ''
    raise CheckpointError(f'{path}: no such model file{hint}')
  if not zipfile.is_zipfile(path):
    raise CheckpointError(f'{path}: not a model file of easunet_jax (not an .npz archive: another format, '
                          'or cut short)')
  try:
    with np.load(path) as f:
      meta = json.loads(str(f['meta']))
  except (OSError, ValueError, KeyError, *_ARCHIVE_ERRORS) as e:
    raise CheckpointError(f'{path}: not a model file of easunet_jax ({e})') from None
  if missing := [k for k in ('step', 'config', 'pixel_mm') if not isinstance(meta, dict) or k not in meta]:
    raise CheckpointError(f'{path}: not a model file of easunet_jax (its meta has no {", ".join(missing)})')
  return meta


def _known_fields(saved: dict, current: ml_collections.ConfigDict) -> dict:
  """`saved` (a config as a dict) without the fields that `current` lacks."""
  return {k: _known_fields(v, current[k]) if isinstance(v, dict) else v
          for k, v in saved.items() if k in current}


def config_of(path: str | pathlib.Path, config: ml_collections.ConfigDict | None = None
              ) -> ml_collections.ConfigDict:
  """The config a model file was trained with (fields added since take their defaults, fields removed
  since are dropped, model.depthwise_impl the default's), its predict.spacing set to the file's pixel
  size; or, given `config` (a --config beside --weights: its predict settings apply), that config with the
  file's pixel size where its predict.spacing is unset."""
  if config is None:
    meta = read_meta(path)
    config = default.get_config()
    saved = _known_fields(meta['config'], config)
    # How the depthwise convolutions run is this machine's choice ('pallas' runs on GPUs only, 'native' on
    # CPUs only), not the exporting one's.
    saved.get('model', {}).pop('depthwise_impl', None)
    config.update(saved)
    config.predict.spacing = tuple(meta['pixel_mm'])
  elif not all(s > 0 for s in config.predict.spacing):  # the file is read only where it has this to give
    config.predict.spacing = tuple(read_meta(path)['pixel_mm'])
  return config


def load(config: ml_collections.ConfigDict, path: str | pathlib.Path, mesh: jax.sharding.Mesh
         ) -> tuple[int, nnx.GraphDef, steps.TrainState]:
  """(step, evaluation graphdef, state replicated over `mesh`) of a model file; its network must be
  config.model's. The state has no optimiser state: it serves forward passes only."""
  meta = read_meta(path)
  checkpoints.check_same_model(meta['config'], config.model, pathlib.Path(path),
                               instead='a model file of this network')
  model = abstract_model(config.model)
  model.eval()
  eval_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  replicated = parallel.shardings(mesh)[1]
  try:
    with np.load(path) as f:
      def fill(prefix: str, tree):
        names = _named_leaves(tree)
        missing = [k for k in names if f'{prefix}{k}' not in f]
        if missing:
          raise CheckpointError(f'{path}: no weights for {prefix}{missing[0]} (and {len(missing) - 1} more)')
        arrays = {k: f[f'{prefix}{k}'] for k in names}
        if wrong := [k for k, leaf in names.items() if arrays[k].shape != leaf.shape]:
          raise CheckpointError(f'{path}: {prefix}{wrong[0]} has shape {arrays[wrong[0]].shape}, the network '
                                f'{names[wrong[0]].shape} (and {len(wrong) - 1} more): weights of another '
                                'network than its config describes')
        leaves = [jax.device_put(np.asarray(arrays[k], np.float32), replicated) for k in names]
        return jax.tree.unflatten(jax.tree.structure(tree), leaves)

      state = steps.TrainState(step=jnp.asarray(meta['step'], jnp.int32), params=fill('params', params),
                               batch_stats=fill('batch_stats', batch_stats), opt_state=())
  except (ValueError, *_ARCHIVE_ERRORS) as e:
    raise CheckpointError(f'{path}: model file corrupt ({e}); export or copy it again') from None
  return meta['step'], eval_graphdef, state
