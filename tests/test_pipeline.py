"""Tests of the Grain pipeline: sample and batch format, resumable iterator, eval batches, mesh."""

import json
import logging
import pickle
import shutil

import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default
from easunet_jax.data import phantom, pipeline, preprocess
from easunet_jax.data import workers as data_workers
from easunet_jax.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  cfg = default.get_config().data
  cfg.root = str(tmp_path_factory.mktemp('knees'))
  # In-plane 60 x 58: the store pads the slices to 64 x 64, the tiny network's multiple of 16.
  phantom.write_dataset(cfg.root, 4, (16, 60, 58), (7.0, 1.0, 1.0), seed=0)
  return preprocess.ensure_slice_store(cfg, tmp_path_factory.mktemp('cache') / 'slices', seed=0, multiple=16)


def test_source_items(store):
  src = pipeline.SliceSource(store / 'train')
  assert len(src) == len(json.loads((store / 'train' / 'index.json').read_text()))
  item = src[0]
  assert item['image'].shape == (64, 64, 1) and item['image'].dtype == np.float16
  assert item['label'].shape == (64, 64) and item['label'].dtype == np.uint8
  assert set(np.unique(item['label'])) <= {0, 1, 2} and item['label'].any()


def test_train_batches(store):
  it = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=4, seed=0, workers=0)
  batch = next(it)
  assert batch['image'].shape == (4, 64, 64, 1) and batch['image'].dtype == np.float16
  assert batch['label'].shape == (4, 64, 64) and batch['label'].dtype == np.uint8
  assert set(np.unique(batch['label'])) == {0, 1, 2}


def test_each_epoch_is_a_new_permutation_of_the_rows(store):
  src = pipeline.SliceSource(store / 'train')
  row_of = {src[i]['image'].tobytes(): i for i in range(len(src))}
  assert len(row_of) == len(src)  # the rows tell apart by their images
  it = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=1, seed=0, workers=0)
  epochs = [[row_of[next(it)['image'][0].tobytes()] for _ in range(len(src))] for _ in range(2)]
  assert all(sorted(epoch) == list(range(len(src))) for epoch in epochs)  # every row once an epoch
  assert epochs[0] != list(range(len(src))) and epochs[1] != epochs[0]


def test_the_trained_pixel_keeps_the_order_of_its_axes(tmp_path):
  """Pixels of 0.5 mm (anterior) by 0.7 mm (superior), as the store's rows give them: recorded and read
  back in that order, from the workdir's record and from the store."""
  store = tmp_path / 'slices'
  (store / 'train').mkdir(parents=True)
  (store / 'splits.json').write_text(json.dumps({'train': ['a'], 'val': [], 'test': []}))
  rows = [{'spacing': [0.5, 0.7]}, {'spacing': [0.5, 0.7]}, {'spacing': [0.6, 0.9]}]
  (store / 'train' / 'index.json').write_text(json.dumps(rows))
  config = default.get_config()
  config.data.cache_dir = str(store)
  assert pipeline.trained_pixel_mm(config, None) == (0.5, 0.7)
  pipeline.record_trained_on(tmp_path, store)
  (store / 'train' / 'index.json').unlink()  # the record alone gives it now
  assert pipeline.trained_pixel_mm(config, tmp_path) == (0.5, 0.7)
  config.data.cache_dir = ''  # nothing says it: one line, also where the workdir is given as a str
  with pytest.raises(DataError, match=r'slices/train/index.json not found'):
    pipeline.trained_pixel_mm(config, str(tmp_path / 'elsewhere'))
  with pytest.raises(ConfigError, match=r'^predict.spacing is unset and neither a workdir nor '):
    pipeline.trained_pixel_mm(config, None)


def test_another_split_of_the_cases_names_the_cases_added_and_removed(store, tmp_path, caplog):
  """A case moved between training and validation or test is refused; cases added or removed alone (a test
  image lost under a split file, a split file without a validation split) are warned of."""
  pipeline.record_trained_on(tmp_path, store)
  splits = json.loads((store / 'splits.json').read_text())
  assert pipeline.check_trained_on(tmp_path, store)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'splits.json').write_text(json.dumps(
      {'train': splits['train'] + ['new_1'] + splits['val'][:1], 'val': splits['val'][1:],
       'test': splits['test']}))
  with pytest.raises(CheckpointError, match=r'\(train \+2 -0 cases, val \+0 -1 cases; '):
    pipeline.check_trained_on(tmp_path, other)
  lost_test = {'train': splits['train'] + ['new_1'], 'val': splits['val'], 'test': splits['test'][1:]}
  no_val = {'train': splits['train'], 'test': splits['test']}
  # A validation case now in test: the best checkpoint was chosen on it.
  val_to_test = {'train': splits['train'], 'val': splits['val'][1:],
                 'test': splits['test'] + splits['val'][:1]}
  alone = 'by cases added or removed alone, none moved between training and validation or test'
  for now, differ, why in ((lost_test, 'train +1 -0 cases, test +0 -1 cases', alone),
                           (no_val, f"val +0 -{len(splits['val'])} cases", alone),
                           (val_to_test, 'val +0 -1 cases, test +1 -0 cases',
                            f"by {splits['val'][0]} val -> test: a case moved between validation and test")):
    (other / 'splits.json').write_text(json.dumps(now))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert pipeline.check_trained_on(tmp_path, other)
    assert f'its split of the cases differs from the one {tmp_path} trained on ({differ}; ' in caplog.text
    assert why in caplog.text


@pytest.mark.parametrize('text', ['{"splits": {"train": ["a"]}, "pix', '[1, 2]',
                                  '{"splits": 5, "pixel_mm": [1, 1]}',
                                  '{"splits": {"train": ["a"]}, "pixel_mm": [0.5]}',
                                  '{"splits": {"train": ["a"]}, "pixel_mm": [Infinity, 0.5]}'])
def test_a_corrupt_record_of_what_a_workdir_trained_on_is_one_line(store, tmp_path, text):
  """Cut short or edited by hand: a CheckpointError naming the file, from the split check and the pixel."""
  (tmp_path / pipeline.TRAINED_ON).write_text(text)
  config = default.get_config()
  for read in (lambda: pipeline.check_trained_on(tmp_path, store), lambda: pipeline.trained_pixel_mm(
      config, tmp_path)):
    with pytest.raises(CheckpointError, match=rf'^{tmp_path}/trained_on.json: corrupt, expected the record '):
      read()


def test_an_older_workdir_is_checked_against_the_store_a_rebuild_would_replace(store, tmp_path):
  """A workdir from before trained_on.json: the store in place, if of the same source files, is what it ran
  on, and a rebuild that would move its training cases into test (cases skipped by a newer version's
  checks, reshuffled) is refused; a store of other files (another run's on a shared data.cache_dir) says
  nothing of it."""
  splits = json.loads((store / 'splits.json').read_text())
  assert not pipeline.check_trained_on(tmp_path, store)  # no record, and no store about to be replaced
  reshuffled = {'train': splits['train'][1:], 'val': splits['val'], 'test': splits['train'][:1]}
  with pytest.raises(CheckpointError, match=rf'not the one {tmp_path} trained on \(train \+0 -1 cases, test '
                     rf'\+1 -{len(splits["test"])} cases; {store}/splits.json\): '):
    pipeline.check_trained_on(tmp_path, store, reshuffled, True)
  assert pipeline.check_trained_on(tmp_path, store, splits, True)
  assert not pipeline.check_trained_on(tmp_path, store, reshuffled, False)


def test_an_older_workdir_gives_its_own_stores_pixel(tmp_path):
  """A workdir from before trained_on.json, without data.cache_dir: the pixel of <workdir>/slices."""
  (tmp_path / 'slices' / 'train').mkdir(parents=True)
  (tmp_path / 'slices' / 'train' / 'index.json').write_text(json.dumps([{'spacing': [0.5, 0.7]}] * 3))
  config = default.get_config()
  config.data.cache_dir = ''
  assert pipeline.trained_pixel_mm(config, tmp_path) == (0.5, 0.7)


def test_iterator_resumed_at_a_step_gives_the_same_batches_whatever_the_workers(store):
  """A run resumed at step 12 (past the end of the first epoch: train has ~20 cartilage slices) reads the
  batches an uninterrupted run reads, with or without worker processes, whichever the run before had."""
  it = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=3, seed=7, workers=0)
  for _ in range(12):
    next(it)
  expected = [next(it) for _ in range(4)]
  for workers in (0, 1):
    resumed = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=3, seed=7,
                                      workers=workers, start=12)
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
      np.testing.assert_array_equal(got['image'], want['image'])
      np.testing.assert_array_equal(got['label'], want['label'])
    if hasattr(resumed, 'close'):
      resumed.close()
  fresh = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=3, seed=7, workers=0)
  assert not np.array_equal(next(fresh)['image'], expected[0]['image'])


def test_the_workers_are_at_most_the_cpus(store, monkeypatch, caplog):
  """data.workers above the CPUs this process may run on (a batch job's allotment, taskset) would only
  take turns on them: lowered, with a line."""
  asked = []
  options = grain.MultiprocessingOptions
  monkeypatch.setattr(grain, 'MultiprocessingOptions', lambda **kw: asked.append(kw) or options(**kw))
  monkeypatch.setattr(data_workers, 'cpus', lambda: 1)
  with caplog.at_level(logging.WARNING):
    pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=3, seed=7, workers=4)
  assert asked == [{'num_workers': 1}]
  assert 'data.workers=4 lowered to 1: this process may run on 1 CPU(s)' in caplog.text


def _rebuilt(store, tmp_path):
  """`store` replaced as a build replaces it: a new folder renamed into its place."""
  shutil.copytree(store, tmp_path / 'rebuilt')
  store.rename(tmp_path / 'stale')
  (tmp_path / 'rebuilt').rename(store)


def test_a_split_rebuilt_in_its_place_is_told_and_refused_to_worker_processes(store, tmp_path):
  """The training's split stays mapped; a worker process, which maps it again by its path, would read
  another run's store: refused."""
  copy = tmp_path / 'store'
  shutil.copytree(store, copy)
  source = pipeline.SliceSource(copy / 'train')
  assert source.is_current() and pickle.loads(pickle.dumps(source)).is_current()
  _rebuilt(copy, tmp_path)
  assert not source.is_current()
  with pytest.raises(DataError, match=r'/store/train: another run rebuilt this slice store while this one '
                     r'trained \(its data.workers read it by its path\)'):
    pickle.loads(pickle.dumps(source))


def test_process_shards_make_up_the_one_process_batches(store, monkeypatch):
  """Each of two processes reads the contiguous half of every global batch."""
  whole = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=4, seed=3, workers=0)
  expected = [next(whole) for _ in range(7)]  # past the end of the first epoch
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  halves = []
  for index in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    it = pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=4, seed=3, workers=0)
    halves.append([next(it) for _ in range(7)])
    assert it.get_state() == whole.get_state()  # so process 0's state resumes every process
  for want, first, second in zip(expected, *halves):
    assert first['image'].shape == (2, 64, 64, 1)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), want[key])
  with pytest.raises(ConfigError, match=r'train\.batch_size'):
    pipeline.train_iterator(pipeline.SliceSource(store / 'train'), batch_size=3, seed=3, workers=0)


def test_eval_batches_padded_in_store_order(store):
  labels = np.load(store / 'val' / 'labels.npy')
  batches = list(pipeline.eval_batches(pipeline.read_split(store, 'val'), 3))
  assert len(batches) == -(-len(labels) // 3)
  assert all(b['image'].shape == (3, 64, 64, 1) and b['label'].shape == (3, 64, 64) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(labels) and mask[:len(labels)].all()
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:len(labels)], labels)
  # 'valid' marks each slice's own pixels, the store's padding around them not.
  valid = np.concatenate([b['valid'] for b in batches])
  assert not valid[len(labels):].any()
  for row, valid_HW in zip(pipeline.read_index(store / 'val'), valid):
    (top, bottom), (left, right) = row['pad']
    expected = np.zeros_like(valid_HW)
    expected[top:64 - bottom, left:64 - right] = True
    np.testing.assert_array_equal(valid_HW, expected)
  assert not valid.all(axis=(1, 2)).any() and valid.any(axis=(1, 2))[:len(labels)].all()


def test_a_split_read_before_its_store_is_rebuilt_keeps_its_rows(store, tmp_path):
  """A training validates on the split it started with, though another run on the same data.cache_dir
  (another seed, another data.root) replaces the store meanwhile, as a rebuild does: renamed aside and
  deleted."""
  copy = tmp_path / 'slices'
  shutil.copytree(store, copy)
  val = pipeline.read_split(copy, 'val')
  labels, index = np.array(val.labels), val.index
  copy.rename(tmp_path / 'aside')
  shutil.copytree(store, copy)
  np.save(copy / 'val' / 'labels.npy', np.zeros_like(labels))
  (copy / 'val' / 'index.json').write_text('[]')
  shutil.rmtree(tmp_path / 'aside')
  batches = list(pipeline.eval_batches(val, 3))
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:len(labels)], labels)
  assert val.index == index and labels.any()


def test_put_on_mesh(store):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  batch = next(pipeline.eval_batches(pipeline.read_split(store, 'val'), 4))
  arrays = pipeline.put_on_mesh(batch, NamedSharding(mesh, P('data')))
  assert arrays['image'].shape == (4, 64, 64, 1)
  assert len(arrays['image'].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(arrays['label']), batch['label'])
