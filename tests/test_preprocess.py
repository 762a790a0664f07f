"""Tests of the slice store: layout, dtypes, ranges, subject-level splits, reuse and rebuild."""

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import default
from easunet_jax import atomic
from easunet_jax.data import phantom, preprocess, volumes
from easunet_jax.errors import ConfigError, DataError

SHAPE, SPACING = (8, 40, 35), (7.0, 1.6, 1.6)


@pytest.fixture(scope='module')
def data_cfg(tmp_path_factory):
  cfg = default.get_config().data
  cfg.root = str(tmp_path_factory.mktemp('knees'))
  phantom.write_dataset(cfg.root, 5, SHAPE, SPACING, seed=0)
  return cfg


@pytest.fixture(scope='module')
def store(data_cfg, tmp_path_factory):
  store = tmp_path_factory.mktemp('cache') / 'slices'
  return preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)


def test_layout_dtypes_and_ranges(store):
  assert list(store.parent.iterdir()) == [store]
  splits = json.loads((store / 'splits.json').read_text())
  assert [len(splits[s]) for s in preprocess.SPLITS] == [3, 1, 1]
  for name in preprocess.SPLITS:
    images = np.load(store / name / 'images.npy', mmap_mode='r')
    labels = np.load(store / name / 'labels.npy', mmap_mode='r')
    index = json.loads((store / name / 'index.json').read_text())
    assert images.dtype == np.float16 and labels.dtype == np.uint8
    assert images.shape == labels.shape == (len(index), 48, 48)  # 40 x 35 padded to multiples of 16
    assert images.min() >= 0 and images.max() <= 1 and set(np.unique(labels)) <= {0, 1, 2}
    assert index[0]['pad'] == [[4, 4], [6, 7]] and index[0]['spacing'] == pytest.approx([1.6, 1.6])
    assert index[0]['sagittal_spacing'] == pytest.approx(SPACING[0])
    assert [row['cartilage'] for row in index] == list(labels.reshape(len(labels), -1).any(1))
    assert {row['case'] for row in index} == set(splits[name])
    if name == 'train':
      assert all(row['cartilage'] for row in index)
    else:
      assert len(index) == SHAPE[0] * len(splits[name])  # whole volumes
      assert [row['slice'] for row in index[:SHAPE[0]]] == list(range(SHAPE[0]))


def test_rows_match_the_volumes(store, data_cfg):
  """The first validation case's rows are its slices in order, image and labels, inside their padding."""
  index = json.loads((store / 'val' / 'index.json').read_text())
  case = next(c for c in volumes.discover_cases(data_cfg.root) if c.id == index[0]['case'])
  image, labels, _ = volumes.load_case(case, data_cfg.label_map)
  inside = (slice(0, SHAPE[0]), slice(4, -4), slice(6, -7))
  np.testing.assert_array_equal(np.load(store / 'val' / 'labels.npy')[inside], labels)
  np.testing.assert_array_equal(np.load(store / 'val' / 'images.npy')[inside], preprocess.normalise(image))


def test_reuse_and_rebuild_on_changed_setting(store, data_cfg, caplog):
  built = (store / 'fingerprint.json').stat().st_mtime_ns
  with caplog.at_level(logging.INFO):
    preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)
  assert 'reused' in caplog.text and (store / 'fingerprint.json').stat().st_mtime_ns == built
  caplog.clear()
  changed = data_cfg.copy_and_resolve_references()
  changed.train_slices = 'all'
  with caplog.at_level(logging.INFO):
    preprocess.ensure_slice_store(changed, store, seed=0, multiple=16)
  assert 'changed: train_slices)' in caplog.text and 'rebuilding' in caplog.text
  assert len(np.load(store / 'train' / 'labels.npy', mmap_mode='r')) == 3 * SHAPE[0]
  caplog.clear()
  with caplog.at_level(logging.INFO):  # without a split file, the seed draws the split
    preprocess.ensure_slice_store(data_cfg, store, seed=1, multiple=16)
  assert 'changed: seed, train_slices)' in caplog.text
  caplog.clear()
  swapped = data_cfg.copy_and_resolve_references()
  swapped.label_map = ((4, 1), (2, 2))  # femoral and tibial cartilage swapped
  with caplog.at_level(logging.INFO):
    preprocess.ensure_slice_store(swapped, store, seed=1, multiple=16)
  assert 'changed: label_map)' in caplog.text
  preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)  # back to the module's store


def test_a_store_of_another_version_is_rebuilt_saying_so(store, data_cfg, tmp_path, caplog):
  """A store of an earlier version (no version recorded) may hold what that version's code got wrong: it is
  rebuilt, named as such, not reported as settings the user never changed."""
  old = tmp_path / 'slices'
  shutil.copytree(store, old)
  fingerprint = json.loads((old / 'fingerprint.json').read_text())
  assert fingerprint.pop('version') == preprocess.STORE_VERSION
  fingerprint['settings'].pop('train_slices')  # as an earlier version wrote its settings
  (old / 'fingerprint.json').write_text(json.dumps(fingerprint))
  checked = []  # what a workdir's check learns: whether the store replaced was of the same source files
  with caplog.at_level(logging.INFO):
    preprocess.ensure_slice_store(data_cfg, old, seed=0, multiple=16,
                                  check_splits=lambda splits, same: checked.append(same))
  assert (f'slice store {old} is stale (built by another version of easunet_jax: store version 1, this one '
          f'builds {preprocess.STORE_VERSION}), rebuilding') in caplog.text
  assert json.loads((old / 'fingerprint.json').read_text())['version'] == preprocess.STORE_VERSION
  other = data_cfg.copy_and_resolve_references()
  other.root = str(tmp_path / 'other')
  phantom.write_dataset(other.root, 3, SHAPE, SPACING, seed=1)
  preprocess.ensure_slice_store(other, old, seed=0, multiple=16,
                                check_splits=lambda splits, same: checked.append(same))
  assert checked == [True, False]


def test_a_kill_while_a_stale_store_is_deleted_leaves_the_new_store_whole(data_cfg, tmp_path, monkeypatch):
  store = preprocess.ensure_slice_store(data_cfg, tmp_path / 'slices', seed=0, multiple=16)
  changed = data_cfg.copy_and_resolve_references()
  changed.train_slices = 'all'
  remove = shutil.rmtree

  def killed_deleting_the_stale_store(path, ignore_errors=False):
    if pathlib.Path(path).name.endswith('.build') or not pathlib.Path(path).exists():
      return remove(path, ignore_errors=ignore_errors)
    (pathlib.Path(path) / 'fingerprint.json').unlink()  # the first file deleted, then the kill
    raise KeyboardInterrupt

  monkeypatch.setattr(shutil, 'rmtree', killed_deleting_the_stale_store)
  with pytest.raises(KeyboardInterrupt):
    preprocess.ensure_slice_store(changed, store, seed=0, multiple=16)
  monkeypatch.undo()
  built = (store / 'fingerprint.json').stat().st_mtime_ns  # the new store, whole
  assert preprocess.ensure_slice_store(changed, store, seed=0, multiple=16) == store
  assert (store / 'fingerprint.json').stat().st_mtime_ns == built  # reused
  assert len(np.load(store / 'train' / 'labels.npy', mmap_mode='r')) == 3 * SHAPE[0]
  # The half-deleted store is left by a process of this id: the next rebuild goes ahead all the same.
  assert (store.parent / (atomic.mark('slices.') + 'old')).is_dir()
  preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['slices']


def test_a_store_named_by_a_link_is_built_where_it_points_and_never_over_the_current_folder(
    data_cfg, tmp_path, monkeypatch):
  (tmp_path / 'big disk' / 'slices').mkdir(parents=True)
  (tmp_path / 'slices').symlink_to(tmp_path / 'big disk' / 'slices')
  for seed in (0, 1):  # built, then rebuilt
    preprocess.ensure_slice_store(data_cfg, tmp_path / 'slices', seed=seed, multiple=16)
  assert (tmp_path / 'slices').is_symlink() and (tmp_path / 'slices' / 'fingerprint.json').is_file()
  assert sorted(p.name for p in (tmp_path / 'big disk').iterdir()) == ['slices']
  (tmp_path / 'empty').mkdir()
  monkeypatch.chdir(tmp_path / 'empty')
  for store in ('.', tmp_path):
    with pytest.raises(ConfigError, match='holds the current folder, which building the store would replace'):
      preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)


def test_a_metaimage_data_file_rewritten_in_place_makes_the_store_stale(data_cfg, tmp_path):
  """An .mhd's voxels live in its .raw: rewriting that file changes the fingerprint, as rewriting a .nii.gz
  does."""
  case = volumes.discover_cases(data_cfg.root)[0]
  nii = volumes.open_volume(case.label)
  labels = tmp_path / 'labels' / 'k.mhd'
  labels.parent.mkdir()
  labels.write_text(f'ObjectType = Image\nNDims = 3\nDimSize = {" ".join(map(str, nii.shape))}\n'
                    'ElementType = MET_UCHAR\nElementDataFile = k_voxels.raw\n')
  raw = tmp_path / 'labels' / 'k_voxels.raw'
  raw.write_bytes(np.asarray(nii.dataobj, np.uint8).tobytes(order='F'))
  assert volumes.data_file(labels) == raw and volumes.data_file(case.label) == case.label
  cases = [volumes.Case('k', case.image, labels)]
  before = preprocess._fingerprint(cases, data_cfg, seed=0, multiple=16)
  raw.write_bytes(raw.read_bytes()[::-1])  # same size, new voxels
  os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
  assert preprocess._fingerprint(cases, data_cfg, seed=0, multiple=16) != before


def test_a_network_of_another_stride_makes_the_store_stale():
  """The slices are padded to a multiple of the network's stride."""
  cfg = default.get_config().data
  assert preprocess._fingerprint([], cfg, 0, 16) != preprocess._fingerprint([], cfg, 0, 32)


def test_normalise_does_not_depend_on_the_intensities_unit():
  image = np.random.default_rng(0).gamma(2.0, 100.0, (6, 20, 20)).astype(np.float32)
  for scale in (1e-10, 1.0, 1e6):
    np.testing.assert_allclose(preprocess.normalise(image * np.float32(scale)).astype(np.float32),
                               preprocess.normalise(image).astype(np.float32), atol=2e-3)
  mostly_zero = np.zeros((6, 20, 20), np.float32)
  mostly_zero[0, 0, :3] = (1.0, 2.0, 4.0)  # the 0.5 and 99.5 percentiles are both 0
  assert preprocess.normalise(mostly_zero).max() == 1.0 and preprocess.normalise(mostly_zero)[0, 0, 0] == 0.25
  # One bright voxel (a vessel, an artefact) beyond the 99.5th percentile does not darken the rest.
  ramp = np.r_[np.linspace(0.0, 1.0, 999), 1000.0].astype(np.float32)
  assert preprocess.normalise(ramp)[500] == pytest.approx(0.5, abs=0.01)
  # 0 and 1 at the 0.5th and 99.5th percentiles (4.995 and 994.005 of 0..999), as the shipped model saw.
  out = preprocess.normalise(np.arange(1000, dtype=np.float32))
  assert out[4] == 0 < out[6] and out[990] < 1 == out[995]


def test_a_fill_at_an_end_of_the_range_is_left_out_of_the_percentiles():
  """An oblique reformat's corners at -32768 (7 % of the voxels), or a block masked bright, would squash the
  knee into a sliver of [0, 1]; a background of zeros, a value the tissue reaches too, stays in them."""
  rng = np.random.default_rng(0)
  knee = rng.gamma(2.0, 100.0, (6, 40, 40)).astype(np.float32)
  corners = np.zeros(knee.shape, bool)
  corners[:, :8, :8] = corners[:, -8:, -8:] = True
  for fill in (-32768.0, 10 * knee.max()):
    filled = np.where(corners, np.float32(fill), knee)
    out = preprocess.normalise(filled).astype(np.float32)
    np.testing.assert_allclose(out[~corners], preprocess.normalise(knee[~corners]).astype(np.float32),
                               atol=2e-3)
    assert (out[corners] == (0.0 if fill < 0 else 1.0)).all()
  background = np.where(corners, np.float32(0.0), knee)
  hi = np.percentile(background, 99.5)
  np.testing.assert_allclose(preprocess.normalise(background).astype(np.float32),
                             np.clip(background / hi, 0, 1), atol=1e-3)


@pytest.mark.parametrize('n', [3, 5, 10, 31])
def test_split_is_by_subject_and_seeded(n):
  ids = [f'k{i:02d}' for i in range(n)]
  splits = preprocess.split_cases(ids, (0.7, 0.1, 0.2), seed=1)
  parts = [set(splits[s]) for s in preprocess.SPLITS]
  assert all(parts) and sum(map(len, parts)) == n and set().union(*parts) == set(ids)
  assert splits == preprocess.split_cases(ids, (0.7, 0.1, 0.2), seed=1)
  assert n < 10 or splits != preprocess.split_cases(ids, (0.7, 0.1, 0.2), seed=2)


def test_the_split_gives_a_leftover_case_to_the_largest_remainder():
  splits = preprocess.split_cases([f'k{i}' for i in range(10)], (0.66, 0.24, 0.1), seed=0)
  assert [len(splits[name]) for name in preprocess.SPLITS] == [7, 2, 1]  # shares 6.6, 2.4, 1.0


def _linked_copy(source, root):
  """A data root of links to `source`'s images and labels, whose files a test may replace or remove."""
  for kind in ('images', 'labels'):
    (root / kind).mkdir(parents=True)
    for path in sorted((pathlib.Path(source) / kind).iterdir()):
      (root / kind / path.name).symlink_to(path)
  return root


def test_a_case_skipped_on_its_voxels_neither_sizes_the_store_nor_is_warned_of(data_cfg, tmp_path, caplog):
  """A case whose headers pass and whose voxels fail (a constant image) is skipped: the store's slices are
  the size of the cases written (40 x 35 padded to 48 x 48), not of its larger ones, and its other pixel
  size is no scale of the store to warn of."""
  root = _linked_copy(data_cfg.root, tmp_path / 'data')
  image, labels, affine = phantom.make_subject(9, (8, 150, 130), (7.0, 0.5, 0.5))
  volumes.save_volume(root / 'images' / 'flat.nii.gz', np.full_like(image, 3.0), affine)
  volumes.save_volume(root / 'labels' / 'flat.nii.gz', labels, affine)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.root = str(root)
  with caplog.at_level(logging.WARNING):
    store = preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert 'case flat skipped' in caplog.text and 'in-plane pixels' not in caplog.text
  for name in preprocess.SPLITS:
    assert np.load(store / name / 'images.npy', mmap_mode='r').shape[1:] == (48, 48)
    assert {tuple(map(tuple, row['pad'])) for row in json.loads((store / name / 'index.json').read_text())
            } == {((4, 4), (6, 7))}


def test_the_phantom_in_use_is_said_once(tmp_path, caplog):
  """A run resolves its data root in several places (store, split file, evaluation): one line says that
  the phantom stands in for data.root."""
  cfg = default.get_config().data
  cfg.update(phantom_num=2, phantom_shape=(4, 24, 24), phantom_dir=str(tmp_path / 'phantom'))
  with caplog.at_level(logging.INFO):
    roots = {preprocess.resolve_data_root(cfg, tmp_path / 'run', seed=0) for _ in range(3)}
  assert roots == {tmp_path / 'phantom'} and caplog.text.count('data.root is unset') == 1


def test_split_file_and_its_errors(data_cfg, tmp_path):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.split_file = str(tmp_path / 'splits.json')
  ids = [f'phantom_{i:03d}' for i in range(5)]
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:2], 'val': ids[2:4], 'test': ids[4:]}))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert json.loads((store / 'splits.json').read_text())['val'] == ids[2:4]
  # The split file decides the split: runs of another seed or data.split (a sweep's) share the store.
  built = (store / 'fingerprint.json').stat().st_mtime_ns
  other = cfg.copy_and_resolve_references()
  other.split = (0.5, 0.25, 0.25)
  preprocess.ensure_slice_store(other, store, seed=1, multiple=16)
  assert (store / 'fingerprint.json').stat().st_mtime_ns == built
  # As Windows Notepad saves it: UTF-8 with a byte-order mark.
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:3], 'val': ids[3:4], 'test': ids[4:]}),
                                        encoding='utf-8-sig')
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'slices_bom', seed=0, multiple=16)
  assert json.loads((store / 'splits.json').read_text())['train'] == ids[:3]
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ['nope'], 'val': [], 'test': []}))
  with pytest.raises(DataError) as e:
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices2', seed=0, multiple=16)
  assert 'nope' in str(e.value) and '\n' not in str(e.value)
  (tmp_path / 'splits.json').write_bytes(b'{"train": ["caf\xe9"], "val": [], "test": []}')  # Latin-1
  with pytest.raises(DataError, match=r'^data.split_file .*splits.json: cannot read JSON \('):
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices2', seed=0, multiple=16)
  # nnU-Net's splits_final.json: five folds of train and val, no test.
  (tmp_path / 'splits.json').write_text(json.dumps([{'train': ids[:4], 'val': ids[4:]}] * 5))
  with pytest.raises(DataError, match=re.escape(
      "splits.json: a list of 5 fold(s), as nnU-Net's splits_final.json; expected one split "
      '{"train": [...], "val": [...], "test": [...]}: write one fold so, with test cases from imagesTr/ '
      '(imagesTs/ is not read)')):
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices2', seed=0, multiple=16)
  # Test cases named from nnU-Net's imagesTs/, which the store does not read.
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:3], 'val': ids[3:], 'test': ['knee07']}))
  (tmp_path / 'nnunet' / 'imagesTs').mkdir(parents=True)
  (tmp_path / 'typo' / 'imagesTs').mkdir(parents=True)
  for root in ('nnunet', 'typo'):
    (tmp_path / root / 'imagesTs' / f"{'knee07' if root == 'nnunet' else 'knee08'}_0000.nii.gz").touch()
  for root, hint in ((cfg.root, False), (tmp_path / 'nnunet', True), (tmp_path / 'typo', False)):
    with pytest.raises(DataError, match=r"case ids not found under data.root: \['knee07'\]") as e:
      preprocess._read_split_file(cfg.split_file, root, ids, [])
    assert str(e.value).endswith(' (imagesTs/ is not read: move the test cases into imagesTr/ and '
                                 'labelsTr/)') == hint
  for bad, message in (({'train': ids, 'val': None, 'test': []}, '"val": expected a list of case ids'),
                       ({'train': [ids], 'val': [], 'test': []}, '"train": expected a list of case ids')):
    (tmp_path / 'splits.json').write_text(json.dumps(bad))
    with pytest.raises(DataError, match=message):
      preprocess.ensure_slice_store(cfg, tmp_path / 'slices2', seed=0, multiple=16)


def test_a_split_file_may_list_a_case_the_checks_skip(data_cfg, tmp_path):
  """A case the split file lists whose label map is gone: skipped as unusable, and in no split."""
  root = _linked_copy(data_cfg.root, tmp_path / 'data')
  (root / 'labels' / 'phantom_004.nii.gz').unlink()
  ids = [f'phantom_{i:03d}' for i in range(5)]
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:3], 'val': ids[3:4], 'test': ids[4:]}))
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(root=str(root), split_file=str(tmp_path / 'splits.json'))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  assert list(json.loads((store / 'skipped.json').read_text())) == ['phantom_004']
  assert json.loads((store / 'splits.json').read_text()) == {'train': ids[:3], 'val': ids[3:4], 'test': []}


def test_a_split_file_whose_split_the_checks_empty_is_not_drawn_again(data_cfg, tmp_path, caplog):
  """The split file's only validation case fails the voxel checks: validation stays empty (training then
  refuses to start) rather than drawn again from cases the user set apart for testing."""
  root = _linked_copy(data_cfg.root, tmp_path / 'data')
  nii = nib.load(root / 'labels' / 'phantom_003.nii.gz')
  unknown_values = np.where(np.asarray(nii.dataobj) == 2, 9, 0).astype(np.uint8)
  (root / 'labels' / 'phantom_003.nii.gz').unlink()
  volumes.save_volume(root / 'labels' / 'phantom_003.nii.gz', unknown_values, nii.affine)
  ids = [f'phantom_{i:03d}' for i in range(5)]
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:3], 'val': ids[3:4], 'test': ids[4:]}))
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(root=str(root), split_file=str(tmp_path / 'splits.json'))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  assert json.loads((store / 'splits.json').read_text()) == {'train': ids[:3], 'val': [], 'test': ids[4:]}
  assert 'again' not in caplog.text


def test_a_split_file_listing_a_case_twice_or_leaving_cases_out_is_told(data_cfg, tmp_path, caplog):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.split_file = str(tmp_path / 'splits.json')
  ids = [f'phantom_{i:03d}' for i in range(5)]
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:2], 'val': ids[1:3], 'test': []}))
  with pytest.raises(DataError, match=r'case ids listed more than once: \[.phantom_001.\]'):
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  (tmp_path / 'splits.json').write_text(json.dumps({'train': ids[:2], 'val': ids[2:3], 'test': ids[3:4]}))
  with caplog.at_level(logging.WARNING):
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert 'leaves out 1 usable case(s), which no split uses: phantom_004' in caplog.text


def test_scans_of_different_pixel_sizes_are_warned_of(tmp_path, caplog):
  """Scans of different in-plane pixels are; scans of one pixel that is not square are not."""
  cfg = default.get_config().data
  for name, pixels in (('one', [(1.6, 2.0)] * 3), ('several', [(1.6, 1.6), (1.6, 1.6), (2.0, 2.0)])):
    cfg.root = str(tmp_path / name)
    for i, pixel in enumerate(pixels):
      image, labels, affine = phantom.make_subject(i, shape=(4, 40, 35), spacing=(7.0, *pixel))
      volumes.save_volume(tmp_path / name / 'images' / f'k{i}.nii.gz', image, affine)
      volumes.save_volume(tmp_path / name / 'labels' / f'k{i}.nii.gz', labels, affine)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      preprocess.ensure_slice_store(cfg, tmp_path / f'slices_{name}', seed=0, multiple=16)
    if name == 'several':
      assert 'have in-plane pixels from 1.6 x 1.6 to 2 x 2 mm' in caplog.text
    else:
      assert 'in-plane pixels' not in caplog.text


def test_a_split_file_may_name_cases_by_number(tmp_path):
  """OAI-ZIB's case ids are numbers, which a split file may hold as JSON numbers."""
  image, labels, affine = phantom.make_subject(1, SHAPE, SPACING)
  for case_id in ('9001104', '9002430'):
    volumes.save_volume(tmp_path / 'knees' / 'images' / f'{case_id}.nii.gz', image, affine)
    volumes.save_volume(tmp_path / 'knees' / 'labels' / f'{case_id}.nii.gz', labels, affine)
  cfg = default.get_config().data
  cfg.root, cfg.split_file = str(tmp_path / 'knees'), str(tmp_path / 'splits.json')
  (tmp_path / 'splits.json').write_text(json.dumps({'train': [9001104], 'val': [9002430], 'test': []}))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert json.loads((store / 'splits.json').read_text()) == {'train': ['9001104'], 'val': ['9002430'],
                                                             'test': []}


def test_bad_train_slices_setting(data_cfg, tmp_path):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.train_slices = 'some'
  with pytest.raises(ConfigError, match=r'data\.train_slices'):
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)


def test_resolve_data_root_generates_phantom(tmp_path, monkeypatch):
  cfg = default.get_config().data
  cfg.phantom_num, cfg.phantom_shape, cfg.phantom_spacing = 1, (4, 16, 16), (7.0, 4.0, 4.0)
  root = preprocess.resolve_data_root(cfg, tmp_path / 'runs' / 'demo', seed=0)
  assert root == tmp_path / 'runs' / 'phantom_4x16x16' and len(volumes.discover_cases(root)) == 1
  # A run of another grid beside it (the demo's and the paper's) makes its own; one of another seed shares it.
  cfg.phantom_shape = (4, 16, 12)
  for run, seed in (('full', 0), ('seed1', 1)):
    root = preprocess.resolve_data_root(cfg, tmp_path / 'runs' / run, seed)
    assert root == tmp_path / 'runs' / 'phantom_4x16x12' and len(volumes.discover_cases(root)) == 1
  cfg.phantom_anatomy, cfg.phantom_oa_fraction, cfg.phantom_elastic_mm = 'reference', 0.5, 3.0
  made = {}  # what the folder's record would hold; not written: 8 s a real-anatomy knee
  monkeypatch.setattr(phantom, 'write_dataset', lambda *args, made_by, **kwargs: made.update(made_by))
  assert preprocess.resolve_data_root(cfg, tmp_path / 'runs' / 'knee', seed=0).name == (
      'phantom_reference_oa0.5_elastic3_4x16x12')
  assert made['effusion_mm'] == 0.0  # recorded, so that a folder of one kind refuses subjects of the other
  cfg.phantom_effusion_mm = 10.0
  assert preprocess.resolve_data_root(cfg, tmp_path / 'runs' / 'knee', seed=0).name == (
      'phantom_reference_oa0.5_elastic3_effusion10_4x16x12')
  assert made['effusion_mm'] == 10.0
  cfg.root = '/somewhere/OAI-ZIB'
  assert str(preprocess.resolve_data_root(cfg, tmp_path, seed=0)) == '/somewhere/OAI-ZIB'


def _bad_dataset(root):
  """Two good phantom cases and one case of each bad input, in the images/ + labels/ layout."""
  image, labels, affine = phantom.make_subject(1, SHAPE, SPACING)
  for case_id in ('good_a', 'good_b', 'truncated', 'not_nifti', 'flat_2d', 'time_4d', 'shapes', 'affines',
                  'nan', 'huge', 'underflow', 'constant', 'outside_map', 'unlabelled'):
    volumes.save_volume(root / 'images' / f'{case_id}.nii.gz', image, affine)
    volumes.save_volume(root / 'labels' / f'{case_id}.nii.gz', labels, affine)
  data = (root / 'images/truncated.nii.gz').read_bytes()
  (root / 'images/truncated.nii.gz').write_bytes(data[:len(data) // 2])
  (root / 'labels/not_nifti.nii.gz').write_text('case,label\n1,2\n')
  for case_id, bad_image in (('flat_2d', image[4]), ('time_4d', image[..., None].repeat(2, -1)),
                             ('shapes', image[:, :, :-1]), ('nan', np.where(labels == 2, np.nan, image)),
                             ('huge', np.where(labels == 2, 1e300, image.astype(np.float64))),
                             ('underflow', image.astype(np.float64) * 1e-300),
                             ('constant', np.full_like(image, 7.0))):
    volumes.save_volume(root / 'images' / f'{case_id}.nii.gz', bad_image, affine)
  shifted = affine.copy()
  shifted[:3, 3] += 0.01
  volumes.save_volume(root / 'labels/affines.nii.gz', labels, shifted)
  outside = np.where(labels == 2, 9, labels).astype(np.uint8)
  volumes.save_volume(root / 'labels/outside_map.nii.gz', outside, affine)
  (root / 'labels/unlabelled.nii.gz').unlink()
  (root / 'images/broken_link.nii.gz').symlink_to(root / 'purged' / 'scan.nii.gz')  # a link to a removed file
  (root / 'labels/broken_link.nii.gz').symlink_to(root / 'labels/good_a.nii.gz')
  volumes.save_volume(root / 'images/label_link_broken.nii.gz', image, affine)  # its label map unmounted
  (root / 'labels/label_link_broken.nii.gz').symlink_to(root / 'unmounted' / 'label.nii.gz')


BAD = {'truncated': 'truncated', 'not_nifti': 'not a readable NIfTI', 'flat_2d': '2D', 'time_4d': '4D',
       'shapes': 'shape', 'affines': 'affines', 'nan': 'NaN',
       'huge': 'image values reach 1e+300, beyond float32',
       'underflow': "below float32's normal numbers (from 1.2e-38); rescale the scan",
       'constant': 'image is constant', 'outside_map': '[9]',
       'unlabelled': 'no label', 'broken_link': 'images/broken_link.nii.gz: a broken link (to ',
       'label_link_broken': 'labels/label_link_broken.nii.gz: a broken link (to '}


def test_a_split_that_late_checks_emptied_is_split_again(data_cfg, tmp_path, caplog):
  """A case whose label values fail (read with the voxels, after the split) was the seeded split's only
  validation case: the cases that passed are split again, so validation is not left empty."""
  root = _linked_copy(data_cfg.root, tmp_path / 'data')
  planned = preprocess.split_cases([f'phantom_00{i}' for i in range(5)], (0.6, 0.2, 0.2), seed=0)
  [bad] = planned['val']
  nii = nib.load(root / 'labels' / f'{bad}.nii.gz')
  labels = np.asarray(nii.dataobj)
  (root / 'labels' / f'{bad}.nii.gz').unlink()  # the link; then a file of its own
  volumes.save_volume(root / 'labels' / f'{bad}.nii.gz', np.where(labels == 2, 9, labels), nii.affine)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(root=str(root), split=(0.6, 0.2, 0.2))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  splits = json.loads((store / 'splits.json').read_text())
  assert list(json.loads((store / 'skipped.json').read_text())) == [bad]
  assert [len(splits[name]) for name in preprocess.SPLITS] == [2, 1, 1] and bad not in splits['val']
  assert 'the cases of the val split were all skipped: the 4 cases that passed are split again' in caplog.text


def test_a_split_file_holds_label_maps_without_images_only_for_synthesis(data_cfg, tmp_path):
  """The sweep's split file: a label map beside images without its own image is split only with data.synth
  (the stores of other runs skip it, which could leave a split empty)."""
  root = _linked_copy(data_cfg.root, tmp_path / 'data')
  (root / 'images' / 'phantom_004.nii.gz').unlink()
  config = default.get_config()
  config.data.root = str(root)
  for synth in (False, True):
    config.data.synth = synth
    preprocess.write_split_file(config, tmp_path, tmp_path / 'splits.json')
    ids = sorted(i for part in json.loads((tmp_path / 'splits.json').read_text()).values() for i in part)
    assert ids == [f'phantom_00{i}' for i in range(4 + synth)]


def test_cases_whose_header_lost_the_geometry_are_warned_of(tmp_path, caplog):
  """An identity affine (1 mm voxels, axes as stored) is what a conversion that lost the geometry writes; a
  1 mm header in another orientation is not one."""
  image, labels, affine = phantom.make_subject(1, SHAPE, SPACING)
  one_mm_lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # as ITK writes a 1 mm scan: not an identity header
  for case_id, case_affine in (('posed', affine), ('lost', np.eye(4)), ('lps', one_mm_lps)):
    volumes.save_volume(tmp_path / 'knees' / 'images' / f'{case_id}.nii.gz', image, case_affine)
    volumes.save_volume(tmp_path / 'knees' / 'labels' / f'{case_id}.nii.gz', labels, case_affine)
  cfg = default.get_config().data
  cfg.root, cfg.split = str(tmp_path / 'knees'), (1, 1, 0)
  preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert ("1 case(s) with the identity for their header's voxel-to-world affine (1 mm voxels, axes as "
          'stored, as a conversion that lost the geometry writes it): lost; they are sliced') in caplog.text


def test_bad_cases_named_skipped_and_rest_processed(tmp_path, caplog, dead_mark):
  _bad_dataset(tmp_path / 'knees')
  cfg = default.get_config().data
  cfg.root, cfg.split = str(tmp_path / 'knees'), (1, 1, 0)
  killed_build = tmp_path / 'cache' / (dead_mark('slices.') + 'build')  # left by a killed run
  killed_build.mkdir(parents=True)
  (killed_build / 'images.npy').write_bytes(b'half')
  with caplog.at_level(logging.INFO):
    store = preprocess.ensure_slice_store(cfg, tmp_path / 'cache' / 'slices', seed=0, multiple=16)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for case_id, word in BAD.items():
    line = next(m for m in warnings if f'case {case_id} skipped' in m)
    assert word in line and '\n' not in line, line
  assert len(warnings) == len(BAD)
  assert f'{len(BAD)} of {len(BAD) + 2} cases skipped' in caplog.text
  splits = json.loads((store / 'splits.json').read_text())
  assert sorted(splits['train'] + splits['val'] + splits['test']) == ['good_a', 'good_b']
  assert sorted(json.loads((store / 'skipped.json').read_text())) == sorted(BAD)
  rows = {row['case'] for name in preprocess.SPLITS
          for row in json.loads((store / name / 'index.json').read_text())}
  assert rows == {'good_a', 'good_b'}
  # Nothing partial: no build folder beside the store, no temporary file in it.
  assert sorted(p.name for p in store.parent.iterdir()) == ['slices']
  assert sorted(p.name for p in store.rglob('*') if p.is_file()) == sorted(
      ['splits.json', 'skipped.json', 'fingerprint.json'] + [f for _ in range(3) for f in (
          'images.npy', 'labels.npy', 'index.json')])


def test_no_usable_case_is_one_line_error(tmp_path):
  _, labels, affine = phantom.make_subject(1, SHAPE, SPACING)
  volumes.save_volume(tmp_path / 'images/k.nii.gz', np.zeros(SHAPE, np.float32), affine)
  volumes.save_volume(tmp_path / 'labels/k.nii.gz', labels, affine)
  cfg = default.get_config().data
  cfg.root = str(tmp_path)
  with pytest.raises(DataError, match='no usable case') as e:
    preprocess.ensure_slice_store(cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert '\n' not in str(e.value) and not (tmp_path / 'slices').exists()


def test_a_store_that_cannot_be_built_is_named_in_one_line(data_cfg, tmp_path):
  (tmp_path / 'runs').write_text('')  # a file where the store's folder was meant to be
  with pytest.raises(DataError, match=rf'^{tmp_path}/runs/slices: cannot build the slice store there '
                     r'\(Not a directory\)$'):
    preprocess.ensure_slice_store(data_cfg, tmp_path / 'runs' / 'slices', seed=0, multiple=16)


def test_crash_leaves_no_store_and_no_build_folder(data_cfg, tmp_path, monkeypatch):
  load = volumes.load_case
  calls = []

  def crash_on_third(case, label_map):
    calls.append(case.id)
    if len(calls) == 3:
      raise MemoryError('simulated')
    return load(case, label_map)

  monkeypatch.setattr(volumes, 'load_case', crash_on_third)
  with pytest.raises(MemoryError):
    preprocess.ensure_slice_store(data_cfg, tmp_path / 'slices', seed=0, multiple=16)
  assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_the_store_is_written_is_one_line_naming_the_store(data_cfg, tmp_path, monkeypatch):
  """numpy's 'Not enough free space' (no file named) as a case is written, and the space of a split's file
  found missing as it is reserved (a memory map written on a full disk would end the process, a bus
  error): one line naming the store, the build folder gone."""
  save = np.save

  def full_disk(path, array):
    if len(list((tmp_path / 'a').glob('*.build/*/*.tmp.npy'))) >= 2:
      raise OSError(f'Not enough free space to write {array.nbytes} bytes after offset 128')
    save(path, array)

  monkeypatch.setattr(np, 'save', full_disk)
  with pytest.raises(DataError, match=r'/a/slices: cannot write the slice store \(Not enough free space to '
                     r'write \d+ bytes after offset 128\); make room there, or name another folder '
                     r'\(data.cache_dir\)$'):
    preprocess.ensure_slice_store(data_cfg, tmp_path / 'a' / 'slices', seed=0, multiple=16)
  assert list((tmp_path / 'a').iterdir()) == []
  monkeypatch.undo()

  def no_space(fd, offset, length):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'posix_fallocate', no_space, raising=False)
  with pytest.raises(DataError, match=r'/b/slices: cannot write the slice store \(No space left on device\)'):
    preprocess.ensure_slice_store(data_cfg, tmp_path / 'b' / 'slices', seed=0, multiple=16)
  assert list((tmp_path / 'b').iterdir()) == []


def test_a_killed_builds_folder_goes_also_where_the_store_is_current(store, data_cfg, dead_mark):
  gone = subprocess.Popen([sys.executable, '-c', ''])  # a process id no process has any more
  gone.wait()
  killed = store.with_name(dead_mark(f'{store.name}.', gone.pid) + 'build')
  (killed / 'train').mkdir(parents=True)
  preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)
  assert not killed.exists() and (store / 'fingerprint.json').exists()


def test_cases_in_worker_processes_build_the_same_store(data_cfg, tmp_path, monkeypatch):
  """Label maps alone (synthetic validation images: JAX in the workers) and cases that are skipped (a value
  outside data.label_map, no cartilage under it): two worker processes write the store a single process
  writes, byte for byte."""
  for path in sorted(pathlib.Path(data_cfg.root, 'labels').iterdir()):
    (tmp_path / 'labels').mkdir(exist_ok=True)
    (tmp_path / 'labels' / path.name).write_bytes(path.read_bytes())
  _, labels, affine = phantom.make_subject(1, SHAPE, SPACING)
  volumes.save_volume(tmp_path / 'labels' / 'outside_map.nii.gz', np.where(labels == 2, 9, labels), affine)
  volumes.save_volume(tmp_path / 'labels' / 'no_cartilage.nii.gz', np.where(labels % 2, labels, 0), affine)
  cfg = default.get_config().data
  cfg.root, cfg.synth = str(tmp_path), True
  one = preprocess.ensure_slice_store(cfg, tmp_path / 'one', seed=0, multiple=16)
  monkeypatch.setattr(preprocess, '_PARALLEL_MIN_VOXELS', 0)
  monkeypatch.setattr(preprocess, 'cpus', lambda: 2)
  two = preprocess.ensure_slice_store(cfg, tmp_path / 'two', seed=0, multiple=16)
  skipped = json.loads((two / 'skipped.json').read_text())
  assert skipped.keys() == {'outside_map', 'no_cartilage'}
  assert skipped['no_cartilage'].endswith('holds none of the values data.label_map makes cartilage (2, 4): '
                                          'check data.label_map')
  files = sorted(p.relative_to(one) for p in one.rglob('*') if p.is_file())
  assert files == sorted(p.relative_to(two) for p in two.rglob('*') if p.is_file())
  assert pathlib.Path('val/images.npy') in files and pathlib.Path('train/images.npy') not in files
  for name in files:
    assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_cache_dir_of_other_files_is_not_deleted(data_cfg, tmp_path):
  """A store build replaces its folder: a data.cache_dir that holds anything but a store (the data set, a
  workdir, a shared folder) is refused, and kept."""
  (tmp_path / 'notes.txt').write_text('precious')
  with pytest.raises(DataError, match=rf'^slice store folder {tmp_path}: holds notes\.txt and no slice '
                     r'store \(no fingerprint\.json\), which building the store would delete; name a new '):
    preprocess.ensure_slice_store(data_cfg, tmp_path, seed=0, multiple=16)
  assert (tmp_path / 'notes.txt').read_text() == 'precious'


def test_files_put_in_a_store_since_it_was_built_are_not_deleted_by_its_rebuild(data_cfg, tmp_path):
  """A workdir made inside a store (data.cache_dir = --workdir, preprocessed first) survives the store going
  stale: the rebuild is refused, and the store and the workdir are kept."""
  store = preprocess.ensure_slice_store(data_cfg, tmp_path / 'S', seed=0, multiple=16)
  (store / 'run' / 'checkpoints').mkdir(parents=True)
  (store / '.DS_Store').write_bytes(b'')  # what macOS's Finder leaves in a folder it showed: not in the way
  changed = data_cfg.copy_and_resolve_references()
  changed.train_slices = 'all'
  with pytest.raises(DataError, match=rf'^slice store folder {store}: holds run beside its slice store, '
                     r'which rebuilding the store would delete; move them out, or name another folder \('):
    preprocess.ensure_slice_store(changed, store, seed=0, multiple=16)
  assert (store / 'run' / 'checkpoints').is_dir() and (store / 'fingerprint.json').exists()
  shutil.rmtree(store / 'run')
  preprocess.ensure_slice_store(changed, store, seed=0, multiple=16)
  assert json.loads((store / 'fingerprint.json').read_text())['settings']['train_slices'] == 'all'


def test_a_workdir_inside_the_cache_dir_is_refused(tmp_path):
  config = default.get_config()
  config.data.cache_dir = str(tmp_path / 'C')
  for workdir in (tmp_path / 'C', tmp_path / 'C' / 'run'):
    with pytest.raises(ConfigError, match=rf'^data.cache_dir: {tmp_path / "C"} holds the workdir {workdir}, '
                       'which building the store would replace; name a folder of its own$'):
      preprocess.prepare_data(config, workdir)


def test_a_store_without_its_fingerprint_is_refused_and_a_folder_of_browser_files_used(data_cfg, tmp_path):
  store = preprocess.ensure_slice_store(data_cfg, tmp_path / 'S', seed=0, multiple=16)
  (store / 'fingerprint.json').unlink()
  with pytest.raises(DataError, match=rf'^slice store folder {store}: a slice store without its '
                     r'fingerprint\.json \(removed, or a copy broken off\), or a folder of other data'):
    preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)
  assert (store / 'train').is_dir()
  (tmp_path / 'new').mkdir()
  (tmp_path / 'new' / '.DS_Store').write_bytes(b'')
  preprocess.ensure_slice_store(data_cfg, tmp_path / 'new', seed=0, multiple=16)
  assert (tmp_path / 'new' / 'fingerprint.json').exists()


@pytest.mark.parametrize('damage', ['cut short', 'missing', 'another row count', 'fingerprint cut short',
                                    'splits missing'])
def test_an_up_to_date_store_with_a_damaged_file_is_rebuilt(data_cfg, tmp_path, caplog, damage):
  """A store that a full disk or a broken copy left incomplete is rebuilt, where reusing it would end in a
  traceback of the first read."""
  store = preprocess.ensure_slice_store(data_cfg, tmp_path / 'S', seed=0, multiple=16)
  whole = {path: path.read_bytes() for path in store.rglob('*.npy')}
  damaged = store / {'fingerprint cut short': 'fingerprint.json', 'splits missing': 'splits.json'}.get(
      damage, 'val/labels.npy')
  if damage in ('cut short', 'fingerprint cut short'):
    os.truncate(damaged, damaged.stat().st_size // 2)
  elif damage in ('missing', 'splits missing'):
    damaged.unlink()
  else:
    np.save(damaged, np.load(damaged)[1:])
  with caplog.at_level(logging.INFO):
    preprocess.ensure_slice_store(data_cfg, store, seed=0, multiple=16)
  why = {'another row count': 'holds other rows than its index.json',
         'fingerprint cut short': 'is cut short: '}.get(damage, 'is missing or cut short: ')
  assert f'slice store {store} is stale ({damaged} {why}' in caplog.text and 'rebuilding' in caplog.text
  assert {path: path.read_bytes() for path in store.rglob('*.npy')} == whole


def test_a_tissue_map_off_its_label_maps_grid_skips_its_case(data_cfg, tmp_path):
  """A tissue map is the anatomy a synthesised image draws: one whose header lies on another grid than its
  label map's (the same voxels with the anterior axis reversed: another place in the world; or
  another shape) would draw it elsewhere than the
  labels, and skips its case, named."""
  root = tmp_path / 'data'
  for kind in ('images', 'labels', 'tissues'):
    (root / kind).mkdir(parents=True)
    for path in sorted((pathlib.Path(data_cfg.root) / kind).iterdir()):
      (root / kind / path.name).symlink_to(path)
  for case_id, change in (('phantom_000', lambda v, a: (v, a @ np.diag([1.0, -1.0, 1.0, 1.0]))),
                          ('phantom_001', lambda v, a: (v[:, :, 1:], a))):
    path = root / 'tissues' / f'{case_id}.nii.gz'
    nii = nib.load(path)
    voxels, affine = change(np.asarray(nii.dataobj), nii.affine)
    path.unlink()
    nib.save(nib.Nifti1Image(voxels, affine), path)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(root=str(root), synth=True)
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  skipped = json.loads((store / 'skipped.json').read_text())
  assert sorted(skipped) == ['phantom_000', 'phantom_001']
  assert 'phantom_000: label map and tissue map grids place a voxel up to' in skipped['phantom_000']
  assert 'tissues/phantom_000.nii.gz' in skipped['phantom_000']
  assert 'phantom_001: label map shape' in skipped['phantom_001']


def test_images_without_labels_are_skipped_also_with_synth(data_cfg, tmp_path):
  """An image without its label map, or a data set without its labels folder: the cases are skipped with
  a warning (contrast synthesis too), not a traceback. A label map without its image is a case for contrast
  synthesis, and skipped without it."""
  root = tmp_path / 'data'
  for kind in ('images', 'labels', 'tissues'):
    (root / kind).mkdir(parents=True)
    for path in sorted((pathlib.Path(data_cfg.root) / kind).iterdir())[:5]:
      (root / kind / path.name).symlink_to(path)
  (root / 'labels' / 'phantom_003.nii.gz').unlink()
  (root / 'images' / 'phantom_004.nii.gz').unlink()
  cfg = data_cfg.copy_and_resolve_references()
  cfg.update(root=str(root), synth=True, split=(0.5, 0.25, 0.25))
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  assert list(json.loads((store / 'skipped.json').read_text())) == ['phantom_003']
  assert any('phantom_004' in ids for ids in json.loads((store / 'splits.json').read_text()).values())
  cfg.synth = False
  store = preprocess.ensure_slice_store(cfg, tmp_path / 'store', seed=0, multiple=16)
  skipped = json.loads((store / 'skipped.json').read_text())
  assert list(skipped) == ['phantom_003', 'phantom_004'] and 'no image file' in skipped['phantom_004']
  no_labels = tmp_path / 'no_labels'
  (no_labels / 'images').mkdir(parents=True)
  (no_labels / 'images' / 'a.nii.gz').symlink_to(root / 'images' / 'phantom_000.nii.gz')
  assert volumes.discover_cases(no_labels) == [volumes.Case('a', no_labels / 'images' / 'a.nii.gz', None)]
