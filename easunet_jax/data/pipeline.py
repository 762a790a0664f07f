"""Grain input pipeline over the slice store: the shuffled training iterator, evaluation batches, and their
placement on the devices. It only reads, shuffles and batches: training augmentation runs on the devices
(`data.augment`, inside the train step)."""

import json
import math
import os
import pathlib
import statistics
from collections.abc import Iterator
from typing import NamedTuple

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from easunet_jax import atomic
from easunet_jax.data import volumes
from easunet_jax.data.workers import at_most_cpus
from easunet_jax.errors import CheckpointError, ConfigError, DataError


def _inode(folder: pathlib.Path) -> int | None:
  """The folder's inode (a store rebuilt renames a new folder into its place); None while there is none."""
  try:
    return os.stat(folder).st_ino
  except FileNotFoundError:
    return None


class SliceSource(grain.sources.RandomAccessDataSource):
  """Random access to one split of the slice store ({'image' (H, W, 1) float16, 'label' (H, W) uint8, and
  'tissue' (H, W) uint8 when the store has tissue maps; no 'image' in data.synth's training split}), its
  .npy files memory-mapped: a store another run rebuilds in its place later leaves them as they were
  (`is_current` tells)."""

  def __init__(self, split_dir: str | pathlib.Path):
    self._dir = pathlib.Path(split_dir)
    self._folder = _inode(self._dir)  # before the files: a store renamed into place meanwhile is not current
    # Mapped here, once, in the thread that builds the source: Grain reads from several threads, and two
    # threads mapping at once failed in the test suite on CPython 3.11.7 (np.load parses the .npy header
    # with ast: "SystemError: AST constructor recursion depth mismatch").
    self._arrays = {kind: np.load(self._dir / f'{kind}s.npy', mmap_mode='r')
                    for kind in ('image', 'label', 'tissue') if (self._dir / f'{kind}s.npy').exists()}

  def is_current(self) -> bool:
    """Whether the split mapped is still the one at its path (no other run rebuilt the store since)."""
    return _inode(self._dir) == self._folder

  def __getstate__(self) -> dict:
    # Worker processes get the path and map the files themselves, instead of a pickled copy of the data.
    return {'split_dir': self._dir, 'folder': self._folder}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['split_dir'])
    if self._folder != state['folder']:
      raise DataError(f'{self._dir}: another run rebuilt this slice store while this one trained (its '
                      'data.workers read it by its path); give each run a data.cache_dir of its own')

  def __len__(self) -> int:
    return len(self._arrays['label'])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    # The store's compact dtypes (float16, uint8) go to the devices as they are: 3 bytes a pixel to move
    # instead of 8, and no conversion on the host. The train step widens them.
    row = {kind: np.array(array[i]) for kind, array in self._arrays.items()}
    if 'image' in row:
      row['image'] = row['image'][..., None]
    return row

  def __repr__(self) -> str:
    return f'SliceSource({self._dir})'


def train_iterator(source: SliceSource, batch_size: int, seed: int, workers: int, start: int = 0
                   ) -> grain.DatasetIterator:
  """Endless shuffled training batches of this process's rows, from global batch `start` on.

  A training step takes one batch, so a run resumed at step `start` continues exactly where it stopped,
  whatever `workers` (Grain's own iterator state differs with and without worker processes). batch_size
  is the global batch. The order is global (keyed by the position in the shuffled stream), and each
  process reads only its contiguous share of each global batch: process p of P gets rows [p * b, (p + 1) *
  b), b = batch_size / P. So P processes train on the same global batches as one.
  """
  processes = jax.process_count()
  if batch_size % processes:
    raise ConfigError(f'train.batch_size: {batch_size} does not divide by the {processes} processes')
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  # A MapDataset batch reads its elements only when indexed, so the slice below reads only this
  # process's blocks: block k * P + p of size b is rows [p * b, (p + 1) * b) of global batch k.
  ds = ds.batch(batch_size // processes, drop_remainder=True)[jax.process_index()::processes][start:]
  # A small read-ahead: a batch of full-size slices is ~10 MB, and the machines may have few cores.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=at_most_cpus(workers, 'data.workers')))
  return iter(it_ds)


def read_index(split_dir: str | pathlib.Path) -> list[dict]:
  """The store's row index of one split: {'case', 'slice', 'spacing', 'sagittal_spacing', 'cartilage', 'pad'}
  per row."""
  return json.loads((pathlib.Path(split_dir) / 'index.json').read_text())


# What a workdir's training ran on, written at its start: the slice store's split of the cases, and the
# training slices' pixel size (the store may later be rebuilt from other data).
TRAINED_ON = 'trained_on.json'


def _median_pixel_mm(split_dir: pathlib.Path) -> list[float]:
  rows = read_index(split_dir)
  return [float(statistics.median(row['spacing'][i] for row in rows)) for i in (0, 1)]


def record_trained_on(workdir: pathlib.Path, store_dir: pathlib.Path) -> None:
  """Writes <workdir>/trained_on.json (`TRAINED_ON`) of the store a training starts on."""
  splits = json.loads((store_dir / 'splits.json').read_text())
  atomic.write_text(workdir / TRAINED_ON, json.dumps(
      {'splits': splits, 'pixel_mm': _median_pixel_mm(store_dir / 'train')}, indent=1))


def _trained_on(record: pathlib.Path) -> dict:
  """The record `record_trained_on` wrote; a CheckpointError where the file holds something else (cut
  short, edited by hand)."""
  try:
    trained = json.loads(record.read_text())
    splits, pixel_mm = trained['splits'], trained['pixel_mm']
    valid = (isinstance(splits, dict) and all(isinstance(ids, list) for ids in splits.values())
             and len(pixel_mm) == 2 and all(math.isfinite(s) and s > 0 for s in pixel_mm))
  except (ValueError, KeyError, TypeError):
    valid = False
  if not valid:
    raise CheckpointError(f'{record}: corrupt, expected the record of the split and pixel size its workdir '
                          'trained on ({"splits": {split: [case ids]}, "pixel_mm": [2 sizes]}); restore it, '
                          'or delete it to go on without its check')
  return trained


def check_trained_on(workdir: pathlib.Path, store_dir: pathlib.Path,
                     splits: dict[str, list[str]] | None = None, same_sources: bool = False) -> bool:
  """Whether there is a record of what `workdir` trained on: its own (an older workdir has none) or, for a
  store about to replace the one in `store_dir` (`splits` given) built from the same source files
  (`same_sources`: not another run's of other data on a shared data.cache_dir), in a workdir without one,
  that store's split. A CheckpointError when the store's split of the cases (`splits`, or that of the store in
  `store_dir`) moves a case between training and validation or test: cases added, removed or skipped (a
  seeded split then reshuffles), another data.root or split file, which would put training cases into
  validation and test. Cases added or removed alone (a test image lost under a split file) are warned of."""
  record = workdir / TRAINED_ON
  if record.exists():
    trained = _trained_on(record)['splits']
  elif splits is not None and same_sources and (store_dir / 'splits.json').exists():
    # A workdir of a version that kept no record: the store it ran on is the one about to be replaced.
    record = store_dir / 'splits.json'
    trained = json.loads(record.read_text())
  else:
    return False
  now = splits if splits is not None else json.loads((store_dir / 'splits.json').read_text())
  # A split the store lacks (a hand-made split file's) holds no cases.
  pairs = [(name, set(now.get(name, [])), set(ids)) for name, ids in trained.items()]
  if differ := [f'{name} +{len(new - old)} -{len(old - new)} cases'
                for name, new, old in pairs if new != old]:
    def held_out(split: dict[str, list[str]]) -> set[str]:
      return {case for name, ids in split.items() if name != 'train' for case in ids}

    if (held_out(now) & set(trained.get('train', []))) or (set(now.get('train', [])) & held_out(trained)):
      raise CheckpointError(f'{store_dir}: its split of the cases is not the one {workdir} trained on '
                            f'({", ".join(differ)}; {record}): cases were added, removed or skipped, or '
                            'data.root or data.split_file changed, so that its validation and test cases '
                            'would hold cases it trained on; use the data it trained on, or another workdir')
    was = {case: name for name, ids in trained.items() for case in ids}
    moved = [f'{case} {was[case]} -> {name}' for name, ids in now.items() for case in ids
             if was.get(case, name) != name]
    why = (f'{", ".join(moved)}: a case moved between validation and test, where the best checkpoint, chosen '
           'on validation, would be scored on a case it was chosen on' if moved else
           'cases added or removed alone, none moved between training and validation or test')
    logging.warning('%s: its split of the cases differs from the one %s trained on (%s; %s) by %s: going on '
                    'with the cases it has', store_dir, workdir, ', '.join(differ), record, why)
  return True


def trained_pixel_mm(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None
                     ) -> tuple[float, float]:
  """In-plane pixel size (mm) a model was trained at: predict.spacing, or when that is 0 what the workdir
  recorded at its training's start (`TRAINED_ON`), else the median of the rows of its training slice store
  (data.cache_dir, else <workdir>/slices)."""
  if all(s > 0 for s in config.predict.spacing):
    return tuple(float(s) for s in config.predict.spacing)
  if workdir is not None and (record := pathlib.Path(workdir) / TRAINED_ON).exists():
    return tuple(_trained_on(record)['pixel_mm'])
  if not (config.data.cache_dir or workdir):
    raise ConfigError('predict.spacing is unset and neither a workdir nor data.cache_dir says at what pixel '
                      "size the model was trained: pass --config.predict.spacing='(<mm>, <mm>)'")
  split_dir = pathlib.Path(config.data.cache_dir or pathlib.Path(workdir) / 'slices') / 'train'
  if not (split_dir / 'index.json').is_file():
    raise DataError(f'{split_dir / "index.json"} not found: it gives the pixel size the model was trained '
                    "at (a sweep point's store is <sweep>/slices: --config.data.cache_dir); pass "
                    "--config.predict.spacing='(<mm>, <mm>)' (or, to predict, "
                    '--config.predict.resample=False)')
  return tuple(_median_pixel_mm(split_dir))


class Split(NamedTuple):
  """One split of the slice store as `read_split` found it: images and labels (N, H, W) memory-mapped, the
  row index (`read_index`), and the split folder's inode (`is_current` tells whether a store another run
  rebuilt has taken its place since)."""
  images: np.ndarray
  labels: np.ndarray
  index: list[dict]
  path: pathlib.Path
  folder: int

  def is_current(self) -> bool:
    """Whether the split mapped is still the one at its path (no other run rebuilt the store since)."""
    return _inode(self.path) == self.folder


def check_not_rebuilt(split: SliceSource | Split, store_dir: pathlib.Path) -> None:
  """A DataError when another run on the same data.cache_dir renamed a rebuilt store into `store_dir` since
  `split` was mapped: which store the run's split checks and records read is then unsure."""
  if not split.is_current():
    raise DataError(f'{store_dir}: another run rebuilt this slice store (data.cache_dir) for other data or '
                    'another split as this one started; give each run a data.cache_dir of its own')


def read_split(store_dir: str | pathlib.Path, split: str) -> Split:
  """One split of the store, mapped now: a store that another run rebuilds in its place later (another seed
  or data.root on the same data.cache_dir) leaves it as it was, since mapped files outlive their deletion,
  so that a training validates on the cases it started with to its end."""
  split_dir = pathlib.Path(store_dir) / split
  folder = _inode(split_dir)  # before the files: a store renamed into place meanwhile is not current
  images, labels = (np.load(split_dir / f'{kind}.npy', mmap_mode='r') for kind in ('images', 'labels'))
  return Split(images, labels, read_index(split_dir), split_dir, folder)


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one split in store order: 'image', 'label', 'valid' (B, H, W) (the pixel is the slice's,
  not the store's zero padding) and 'mask' (B,) (the row is a slice: the last batch is zero-padded with
  mask False, so all have one shape)."""
  images, labels = split.images, split.labels
  pads = np.array([row['pad'] for row in split.index]).reshape(-1, 4)  # top, bottom, left, right
  height, width = labels.shape[1:]
  for start in range(0, len(labels), batch_size):
    top, bottom, left, right = pads[start:start + batch_size, :, None].transpose(1, 0, 2)  # each (n, 1)
    inside_nH = (np.arange(height) >= top) & (np.arange(height) < height - bottom)
    inside_nW = (np.arange(width) >= left) & (np.arange(width) < width - right)
    fill = [(0, batch_size - len(inside_nH)), (0, 0), (0, 0)]
    yield {'image': np.pad(images[start:start + batch_size].astype(np.float32), fill)[..., None],
           'label': np.pad(labels[start:start + batch_size].astype(np.int32), fill),
           'valid': np.pad(inside_nH[:, :, None] & inside_nW[:, None, :], fill),
           'mask': np.arange(batch_size) < len(inside_nH)}


def warn_of_absent_classes(split: Split, split_name: str) -> None:
  """Warns of each training class that no label slice of `split` holds (a wrong data.label_map): both masks
  empty, it scores Dice 1 (100 %) wherever the model marks none of it. The labels are counted a few slices
  at a time: a study's split is gigabytes."""
  counts = sum((np.bincount(split.labels[first:first + 64].ravel(), minlength=256)
                for first in range(0, len(split.labels), 64)), np.zeros(256, np.int64))
  for name, k in volumes.CLASSES.items():
    if not counts[k]:
      logging.warning("no %s case's labels hold %s: its Dice is 1 (100 %%) wherever the model marks none "
                      'of it, and tells nothing; check data.label_map', split_name, name.upper())


def put_on_mesh(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                per_process: bool = False) -> dict[str, jax.Array]:
  """A global batch -> global jax.Arrays laid out by sharding (e.g. P('data')).

  per_process: `batch` holds only this process's rows of the global batch (train_iterator's batches);
  otherwise every process holds all rows (eval_batches'), and each device takes its own rows from them.
  With one process both are the same.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v, None if per_process else v.shape)
          for k, v in batch.items()}
