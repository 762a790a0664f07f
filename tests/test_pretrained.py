"""One-file models: export a checkpoint, load it back for the same forward pass, refuse foreign files, and
the shipped model's file and metadata."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest

from configs import default, tiny
from easunet_jax import checkpoints, config_check, inference, parallel, pretrained, records, steps
from easunet_jax.errors import CheckpointError, DataError


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny model's workdir: one checkpoint of a freshly initialised state and a training store index."""
  workdir = tmp_path_factory.mktemp('export')
  config = tiny.get_config()
  tx = steps.make_optimizer(config.optim, 1)
  state = steps.init_state(config, tx)
  mngr = checkpoints.manager(workdir, keep=1, for_training=True)
  checkpoints.save(mngr, 3, state, config, {checkpoints.BEST_METRIC: 0.5})
  mngr.close()
  (workdir / 'slices' / 'train').mkdir(parents=True)
  (workdir / 'slices' / 'train' / 'index.json').write_text(json.dumps([{'spacing': [0.5, 0.6]}] * 3))
  return workdir


def test_export_then_load_gives_the_same_forward_pass(workdir, tmp_path):
  config = tiny.get_config()
  meta = pretrained.export(config, workdir, tmp_path / 'model.npz')
  assert meta['step'] == 3 and meta['pixel_mm'] == [0.5, 0.6] and meta['config'] == config.to_dict()
  loaded = pretrained.config_of(tmp_path / 'model.npz')
  assert tuple(loaded.predict.spacing) == (0.5, 0.6)
  assert tuple(loaded.model.features) == tuple(config.model.features)
  mesh = parallel.make_mesh()
  step, graphdef, state = pretrained.load(loaded, tmp_path / 'model.npz', mesh)
  _, _, reference = steps.restore_for_inference(config, workdir, mesh)
  image = np.random.default_rng(0).random((4, 32, 32, 1), np.float32)
  got = jax.jit(steps.forward, static_argnames='graphdef')(state, image, graphdef=graphdef)
  want = jax.jit(steps.forward, static_argnames='graphdef')(reference, image, graphdef=graphdef)
  assert step == 3
  # Weights stored in float16: logits agree to its rounding.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2)
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 0  # float16 really was stored


def test_diverged_weights_are_neither_exported_nor_used(workdir, tmp_path):
  """A checkpoint whose weights outgrew float16 is not exported (they would be stored as inf), and a network
  whose outputs are NaN is not used: its masks would be empty, as of scans without cartilage."""
  config = tiny.get_config()
  mesh = parallel.make_mesh()
  _, graphdef, state = steps.restore_for_inference(config, workdir, mesh)
  diverged = tmp_path / 'diverged'
  shutil.copytree(workdir, diverged, ignore=shutil.ignore_patterns('checkpoints'))
  huge = jax.tree.map(lambda w: w * 1e6, state.params)
  mngr = checkpoints.manager(diverged, keep=1, for_training=True)
  checkpoints.save(mngr, 7, dataclasses.replace(state, params=huge), config, {checkpoints.BEST_METRIC: 0.5})
  mngr.close()
  with pytest.raises(CheckpointError, match=rf"^{diverged}: step 7's params\S+ reach \S+, beyond the "
                     r'float16 a model file stores \(65504\): a diverged training; export an earlier'):
    pretrained.export(config, diverged, tmp_path / 'model.npz')
  nan_statistics = jax.tree.map(lambda s: s * np.nan, state.batch_stats)
  mngr = checkpoints.manager(diverged, keep=1, for_training=True)
  checkpoints.save(mngr, 8, dataclasses.replace(state, batch_stats=nan_statistics), config,
                   {checkpoints.BEST_METRIC: 0.5})
  mngr.close()
  with pytest.raises(CheckpointError, match=rf"^{diverged}: step 8's batch_stats\S+ hold NaN or infinite "
                     r'values: a diverged training'):
    pretrained.export(config, diverged, tmp_path / 'model.npz')
  assert not (tmp_path / 'model.npz').exists()
  network = inference.Network(config, graphdef, dataclasses.replace(state, params=jax.tree.map(
      lambda w: w * np.nan, state.params)), mesh)
  with pytest.raises(CheckpointError, match=r'^the network outputs NaN or infinite values: its weights'):
    network(np.zeros((2, 32, 32), np.float32))


def test_foreign_and_missing_files_are_one_line_errors(workdir, tmp_path):
  config = tiny.get_config()
  with pytest.raises(CheckpointError, match='no such model file'):
    pretrained.read_meta(tmp_path / 'absent.npz')
  # A workdir or checkpoint folder given as --weights is there: it is named a folder, not "no such" file.
  with pytest.raises(CheckpointError, match=rf"^{workdir}: a folder, not a model file \(the \.npz that "
                     r"--mode=export writes from a training's workdir\)$"):
    pretrained.read_meta(workdir)
  (tmp_path / 'foreign.npz').write_bytes(b'not a zip')
  with pytest.raises(CheckpointError, match='not a model file'):
    pretrained.read_meta(tmp_path / 'foreign.npz')
  pretrained.export(config, workdir, tmp_path / 'model.npz')
  other = tiny.get_config()
  other.model.features = (8, 16, 32)
  with pytest.raises(CheckpointError, match='trained with model'):
    pretrained.load(other, tmp_path / 'model.npz', parallel.make_mesh())
  with np.load(tmp_path / 'model.npz') as f:
    arrays = dict(f)
  cut = sorted(name for name in arrays if name.startswith('params'))[:2]
  np.savez(tmp_path / 'cut.npz', **{name: a for name, a in arrays.items() if name not in cut})
  with pytest.raises(CheckpointError, match=rf'cut\.npz: no weights for {re.escape(cut[0])} \(and 1 more\)$'):
    pretrained.load(config, tmp_path / 'cut.npz', parallel.make_mesh())
  # Its metadata says this network, its arrays another's (a head cut to two classes, by hand).
  head = next(name for name, a in arrays.items() if name.startswith('params') and a.shape[-1:] == (3,))
  cut_head = arrays[head][..., :2]
  np.savez(tmp_path / 'two_classes.npz', **{**arrays, head: cut_head})
  with pytest.raises(CheckpointError, match=rf'two_classes\.npz: {re.escape(head)} has shape '
                     rf'{re.escape(str(cut_head.shape))}, the network {re.escape(str(arrays[head].shape))} '
                     r'\(and 0 more\): weights of another network'):
    pretrained.load(config, tmp_path / 'two_classes.npz', parallel.make_mesh())
  meta = json.loads(str(arrays['meta']))
  del meta['pixel_mm']
  np.savez(tmp_path / 'no_pixel.npz', **{**arrays, 'meta': np.array(json.dumps(meta))})
  with pytest.raises(CheckpointError, match=r'no_pixel\.npz: not a model file of easunet_jax \(its meta has '
                     r'no pixel_mm\)$'):
    pretrained.config_of(tmp_path / 'no_pixel.npz')


def test_a_file_of_an_earlier_version_or_fine_tuned_elsewhere_predicts(workdir, tmp_path):
  pretrained.export(tiny.get_config(), workdir, tmp_path / 'model.npz')
  with np.load(tmp_path / 'model.npz') as f:
    arrays = dict(f)
  meta = json.loads(str(arrays['meta']))
  meta['config']['predict']['tta'] = False  # a field of earlier versions
  del meta['config']['model']['fusion']  # a field added since, whose default it was trained as
  meta['config']['train']['init_weights'] = 'on/another/machine.npz'  # where its training started
  meta['config']['data'].update(root='on/another/machine', split_file='on/another/machine/splits.json')
  meta['config']['model']['depthwise_impl'] = 'pallas'  # exported on a GPU
  arrays['meta'] = np.array(json.dumps(meta))
  np.savez(tmp_path / 'old.npz', **arrays)
  config = pretrained.config_of(tmp_path / 'old.npz')
  assert 'tta' not in config.predict and tuple(config.predict.spacing) == (0.5, 0.6)
  assert config.model.depthwise_impl == default.get_config().model.depthwise_impl
  config_check.check_config(config, default.get_config(), 'predict')
  assert pretrained.load(config, tmp_path / 'old.npz', parallel.make_mesh())[0] == 3


def test_damaged_files_and_odd_names_are_one_line_errors_or_work(workdir, tmp_path):
  """A model file cut short or with a damaged array is one CheckpointError line; an export named without
  .npz is written under that name; an export without the training store takes predict.spacing, or names
  the store it needs."""
  config = tiny.get_config()
  pretrained.export(config, workdir, tmp_path / 'model')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
  content = (tmp_path / 'model').read_bytes()
  (tmp_path / 'cut.npz').write_bytes(content[:len(content) // 2])
  with pytest.raises(CheckpointError, match=r'cut\.npz: not a model file of easunet_jax \(not an \.npz'):
    pretrained.read_meta(tmp_path / 'cut.npz')
  damaged = bytearray(content)
  middle = len(content) // 2
  damaged[middle:middle + 16] = bytes(16)  # inside a weight array's compressed bytes: meta still reads
  (tmp_path / 'damaged.npz').write_bytes(damaged)
  with pytest.raises(CheckpointError, match='model file corrupt') as error:
    pretrained.load(pretrained.config_of(tmp_path / 'damaged.npz'), tmp_path / 'damaged.npz',
                    parallel.make_mesh())
  assert '\n' not in str(error.value)
  without_store = tmp_path / 'copied_workdir'
  shutil.copytree(workdir / 'checkpoints', without_store / 'checkpoints')
  with pytest.raises(DataError, match=r'slices/train/index\.json not found'):
    pretrained.export(config, without_store, tmp_path / 'no_store.npz')
  config.predict.spacing = (0.7, 0.7)
  assert pretrained.export(config, without_store, tmp_path / 'no_store.npz')['pixel_mm'] == [0.7, 0.7]


def test_an_export_removes_what_a_killed_export_left_beside_its_file(workdir, tmp_path, dead_mark):
  left = tmp_path / (dead_mark('.') + 'model.npz')
  left.write_bytes(b'half a model')
  pretrained.export(tiny.get_config(), workdir, tmp_path / 'model.npz')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model.npz']


def test_the_file_keeps_the_training_config_and_takes_the_export_predict_settings(workdir, tmp_path):
  """Exported under a shorter --config than it was trained with, the file still holds the training's label
  map (by which --labels are scored); the export's config gives the predict settings and how the network is
  computed. A record cut short by a crash is passed over."""
  copied = tmp_path / 'workdir'
  shutil.copytree(workdir, copied)
  trained = tiny.get_config()
  trained.data.label_map = ((2, 1), (4, 2), (5, 2))  # OAIZIB-CM's two tibial labels
  trained.model.depthwise_impl = 'xla'
  records.record_start(copied, trained, 0)
  with open(copied / 'runs.jsonl', 'a') as f:
    f.write('{"time": "2026-12-06T10:0')
  given = tiny.get_config()
  given.predict.subpixel_tta = False
  pretrained.export(given, copied, tmp_path / 'model.npz')
  config = pretrained.config_of(tmp_path / 'model.npz')
  assert [tuple(pair) for pair in config.data.label_map] == [(2, 1), (4, 2), (5, 2)]
  assert not config.predict.subpixel_tta and config.model.depthwise_impl == given.model.depthwise_impl


def test_a_config_beside_the_file_gives_the_predict_settings(workdir, tmp_path):
  pretrained.export(tiny.get_config(), workdir, tmp_path / 'model.npz')
  given = tiny.get_config()
  given.predict.update(subpixel_tta=False, label_values='oai-zib')
  config = pretrained.config_of(tmp_path / 'model.npz', given)
  assert not config.predict.subpixel_tta and config.predict.label_values == 'oai-zib'
  assert tuple(config.predict.spacing) == (0.5, 0.6)  # the file's pixel size, where the config has none
  given.predict.spacing = (0.4, 0.4)
  assert tuple(pretrained.config_of(tmp_path / 'model.npz', given).predict.spacing) == (0.4, 0.4)


def test_the_shipped_model():
  meta = pretrained.read_meta(pretrained.SHIPPED)
  assert meta['config']['model']['name'] == 'eas_unet'
  assert tuple(meta['config']['model']['features']) == (32, 64, 128, 256, 512)  # the full network
  assert meta['config']['data']['synth'] and meta['config']['data']['phantom_anatomy'] == 'reference'
  assert all(0.3 < p < 1.0 for p in meta['pixel_mm'])
  assert pretrained.SHIPPED.stat().st_size < 12 * 2 ** 20  # a few MB, one file
