"""Volumes -> slice store: subject-level splits, per-volume normalisation, sagittal slices in .npy files.

Layout under the store directory: splits.json, fingerprint.json, skipped.json and per split
<split>/images.npy (N, H, W) float16 in [0, 1], <split>/labels.npy (N, H, W) uint8 training classes, with
data.synth <split>/tissues.npy (N, H, W) uint8 tissue codes (`synth`) and no training images (the train
step draws them from the tissue maps), and <split>/index.json (one entry
per row: case, slice, in-plane and sagittal spacing, whether it holds cartilage, and the zero padding that
centres it in the store's slice size, a multiple of the network's stride).
"""

import collections
import errno
import functools
import json
import logging
import os
import pathlib
import shutil
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import nibabel as nib
import numpy as np

from easunet_jax import atomic, models
from easunet_jax.data import knee, phantom, pipeline, synth, volumes
from easunet_jax.data.workers import cpus, map_in_order
from easunet_jax.errors import ConfigError, DataError, one_line
from easunet_jax.progress import Progress

SPLITS = ('train', 'val', 'test')
# What a store folder holds, and what file browsers leave in folders they show (macOS, Windows): a rebuild
# deletes these, and refuses to where the folder holds anything else.
_STORE_ENTRIES = ('fingerprint.json', 'skipped.json', 'splits.json', *SPLITS, '.DS_Store', 'Thumbs.db',
                  'desktop.ini')
# The version of what a store holds, in its fingerprint: raise it with any change to the code that makes a
# store hold other slices, labels, tissue codes or rows for the same sources and settings, so that the
# stores of earlier versions are rebuilt, not read as current. 1: the stores that record no version (among
# them data.synth stores of renumbered label maps whose cartilage got the tissue codes of bone). 3: slices
# padded to the largest of the cases written, not of every case whose headers passed.
STORE_VERSION = 3
# Below this many voxels in all, one process builds the store faster: a worker process's start and its own
# compilation of `synthetic_image` cost ~20 s. Measured on 2 cores with OAI-ZIB label maps alone (23.6 M
# voxels each): 3 cases 46 s in one process, 65 s in two; 8 cases 153 s and 107 s.
_PARALLEL_MIN_VOXELS = 2 ** 27
# In-plane pixel sizes of a data set's scans further apart than this ratio are warned of.
_PIXEL_SPREAD = 1.1


@functools.cache  # once per process and phantom: a run resolves its data root in several places
def _say_the_phantom_is_used(anatomy: str, num: int, out: pathlib.Path) -> None:
  logging.info('data.root is unset: using the built-in %s phantom (%d subjects in %s); for OAI-ZIB pass '
               '--config.data.root=/path/to/OAI-ZIB', anatomy, num, out)


def resolve_data_root(data_cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, seed: int
                      ) -> pathlib.Path:
  """data_cfg.root, or the built-in phantom (generated once into phantom_dir) when root is ''."""
  if data_cfg.root:
    return pathlib.Path(data_cfg.root)
  generators = {'schematic': phantom.make_tissues,
                'reference': functools.partial(knee.make_tissues, oa_fraction=data_cfg.phantom_oa_fraction,
                                               elastic_mm=data_cfg.phantom_elastic_mm,
                                               effusion_mm=data_cfg.phantom_effusion_mm)}
  if data_cfg.phantom_anatomy not in generators:
    raise ConfigError(f'data.phantom_anatomy: expected one of {sorted(generators)}, '
                      f'got {data_cfg.phantom_anatomy!r}')
  # The default folder is named by what its subjects are, so that runs of other kinds beside each other
  # (the demo's phantom and the paper's) each make their own; one of another seed shares it, as a sweep does.
  name = 'phantom' if data_cfg.phantom_anatomy == 'schematic' else f'phantom_{data_cfg.phantom_anatomy}'
  if data_cfg.phantom_anatomy == 'reference':
    if data_cfg.phantom_oa_fraction:
      name += f'_oa{data_cfg.phantom_oa_fraction:g}'
    if data_cfg.phantom_elastic_mm != knee.ELASTIC_MM:
      name += f'_elastic{data_cfg.phantom_elastic_mm:g}'
    if data_cfg.phantom_effusion_mm:
      name += f'_effusion{data_cfg.phantom_effusion_mm:g}'
  name += '_' + 'x'.join(str(int(n)) for n in data_cfg.phantom_shape)
  default_dir = pathlib.Path(workdir).parent / name
  out = pathlib.Path(data_cfg.phantom_dir or default_dir)
  _say_the_phantom_is_used(data_cfg.phantom_anatomy, data_cfg.phantom_num, out)
  made_by = {'anatomy': data_cfg.phantom_anatomy} | ({
      'oa_fraction': data_cfg.phantom_oa_fraction, 'elastic_mm': data_cfg.phantom_elastic_mm,
      'effusion_mm': data_cfg.phantom_effusion_mm} if data_cfg.phantom_anatomy == 'reference' else {})
  phantom.write_dataset(out, data_cfg.phantom_num, data_cfg.phantom_shape, data_cfg.phantom_spacing, seed,
                        generator=generators[data_cfg.phantom_anatomy], made_by=made_by)
  return out


def split_cases(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
  """Seeded subject-level split; every split with a positive fraction gets a case when there are enough."""
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
    raise ConfigError('data.split: expected three non-negative train/val/test fractions, got '
                      f'{tuple(fractions.tolist())}')
  n = len(ids)
  share = fractions / fractions.sum() * n
  counts = np.floor(share).astype(int)
  counts[np.argsort(counts - share)[:n - counts.sum()]] += 1  # largest remainders first
  for empty in np.flatnonzero((counts == 0) & (fractions > 0)):
    if n >= np.count_nonzero(fractions):
      counts[np.argmax(counts)] -= 1
      counts[empty] += 1
  order = np.random.default_rng(seed).permutation(n)
  bounds = np.cumsum(counts)[:-1]
  return {name: sorted(ids[i] for i in part) for name, part in zip(SPLITS, np.split(order, bounds))}


def _split_file_json(path: str) -> Any:
  """The split file's JSON, read as UTF-8 (with or without the byte-order mark Windows editors write), -16
  or -32."""
  try:
    return json.loads(pathlib.Path(path).read_bytes())
  except OSError as e:
    raise DataError(f'data.split_file {path}: cannot read ({e.strerror})') from None
  except ValueError as e:  # not JSON, or in none of those encodings
    raise DataError(f'data.split_file {path}: cannot read JSON ({e})') from None


def _read_split_file(path: str, root: str, ids: Sequence[str], skipped: Sequence[str]
                     ) -> dict[str, list[str]]:
  """The split file's case ids (of `root`'s cases `ids`); those of skipped (bad) cases are dropped, unknown
  ones are an error."""
  splits = _split_file_json(path)
  if isinstance(splits, list) and splits and all(isinstance(fold, dict) and 'train' in fold
                                                 for fold in splits):
    raise DataError(f"data.split_file {path}: a list of {len(splits)} fold(s), as nnU-Net's "
                    'splits_final.json; expected one split {"train": [...], "val": [...], "test": [...]}: '
                    'write one fold so, with test cases from imagesTr/ (imagesTs/ is not read)')
  if not isinstance(splits, dict) or set(splits) != set(SPLITS):
    raise DataError(f'data.split_file {path}: expected keys {list(SPLITS)}')
  for name in SPLITS:
    if not isinstance(splits[name], list) or not all(isinstance(i, str | int) for i in splits[name]):
      raise DataError(f'data.split_file {path}: "{name}": expected a list of case ids, got {splits[name]!r}')
  # OAI-ZIB's ids are numbers, which JSON may hold as such
  splits = {name: [str(i) for i in splits[name]] for name in SPLITS}
  listed = [i for name in SPLITS for i in splits[name]]
  unknown = sorted(set(listed) - set(ids) - set(skipped))
  if unknown:
    held_out = {stem.removesuffix('_0000')
                for stem, _ in volumes.volume_files(pathlib.Path(root) / 'imagesTs')}
    raise DataError(f'data.split_file {path}: case ids not found under data.root: {unknown[:5]}'
                    + (' (imagesTs/ is not read: move the test cases into imagesTr/ and labelsTr/)'
                       if held_out & set(unknown) else ''))
  if twice := sorted(i for i, n in collections.Counter(listed).items() if n > 1):
    raise DataError(f'data.split_file {path}: case ids listed more than once: {twice[:5]}')
  if left_out := sorted(set(ids) - set(listed)):
    logging.warning('data.split_file %s leaves out %d usable case(s), which no split uses: %s', path,
                    len(left_out), ', '.join(left_out[:5]) + (', ...' if len(left_out) > 5 else ''))
  return {name: sorted(set(splits[name]) - set(skipped)) for name in SPLITS}


def _fingerprint(cases: Sequence[volumes.Case], data_cfg: ml_collections.ConfigDict, seed: int,
                 multiple: int) -> dict:
  # With an .mhd's or .nhdr's data file: a volume rewritten in place changes it, not its header.
  paths = [f for c in cases for p in (c.image, c.label) if p is not None
           for f in dict.fromkeys((p, volumes.data_file(p)))]
  if data_cfg.synth:
    paths += [p for c in cases if c.label is not None and (p := _tissue_path(c)).exists()]
  # A missing file (a broken link) fails its case's checks later, skipped with the others
  files = [[str(p.resolve()), *((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (None, None))]
           for p in paths]
  settings = {'label_map': [list(map(int, pair)) for pair in data_cfg.label_map],
              'train_slices': data_cfg.train_slices, 'synth': data_cfg.synth, 'multiple': multiple}
  # The split is all the seed, data.split or the split file decide of a store: with a split file, its
  # contents alone, so that runs of other seeds (a sweep's) share one store.
  if data_cfg.split_file:
    settings['split_file_contents'] = _split_file_json(data_cfg.split_file)
  else:
    settings |= {'split': list(data_cfg.split), 'seed': seed}
  return {'version': STORE_VERSION, 'sources': files, 'settings': settings}


def _tissue_path(case: volumes.Case) -> pathlib.Path:
  """Where a data set keeps a case's tissue map (the phantoms write tissues/ beside labels/)."""
  return case.label.parent.parent / 'tissues' / f'{case.id}.nii.gz'


def _tissues(case: volumes.Case, label_map: Sequence[Sequence[int]]) -> np.ndarray:
  """The case's tissue codes (canonical order): its tissue map when the data set has one, else derived
  from its source labels (`synth.tissues_from_labels`)."""
  path = _tissue_path(case)
  if path.exists():
    # On the label map's grid, or a synthesised image would draw its anatomy elsewhere than its labels.
    volumes.check_same_grid(volumes.open_volume(case.label), volumes.open_volume(path),
                            volumes.Case(case.id, case.label, path), ('label map', 'tissue map'))
    tissue, _ = volumes.load_labels(volumes.Case(case.id, None, path), [(v, 0) for v in range(256)])
    if tissue.max() >= synth.NUM_TISSUES:
      raise DataError(f'{path}: tissue code {tissue.max()} outside 0..{synth.NUM_TISSUES - 1}')
    return tissue.astype(np.uint8)
  labels, spacing = volumes.load_labels(case, label_map)
  return synth.tissues_from_labels(labels, spacing, label_map)


# Slices rendered by one program: its compilation (~4 s on one core at 128 x 128) depends on the in-plane
# size alone, not on each volume's slice count.
_RENDER_SLICES = 16


@jax.jit
def _render_slices(case_key: jax.Array, rows: jax.Array, tissue_BHW: jax.Array) -> jax.Array:
  return jax.vmap(lambda row, tissue: synth.render(jax.random.fold_in(case_key, row), tissue))(
      rows, tissue_BHW)


def synthetic_image(tissue: np.ndarray, case_id: str) -> np.ndarray:
  """A fixed synthetic image (float32 in [0, 1]) of a volume's tissue map, one draw per sagittal slice from
  a key of the case id and the slice's index: the validation and test images of a data set of label maps
  alone."""
  key = jax.random.key(zlib.crc32(case_id.encode()))
  # The last chunk filled up with the last slice, drawn again and dropped.
  rows = np.minimum(np.arange(padded_size(len(tissue), _RENDER_SLICES)), len(tissue) - 1)
  images = [_render_slices(key, chunk, tissue[chunk]) for chunk in rows.reshape(-1, _RENDER_SLICES)]
  return np.concatenate(images)[:len(tissue)]


def normalise(image: np.ndarray) -> np.ndarray:
  """Clips to the 0.5 / 99.5 percentiles of the volume and scales to [0, 1], whatever the intensities'
  unit (a scan scaled by 1e-10 normalises as the scan); over the full range where the two percentiles are
  one value (a volume 99 % background). A value at an end of the range on more voxels than the clip leaves
  out, whose other voxels lie further from it than they spread, is a fill (an oblique reformat's corners at
  -32768, a region masked bright): the percentiles are of the other voxels, and it clips to 0 or 1."""
  lo, hi = np.percentile(image, (0.5, 99.5))
  low_end, high_end = lo == image.min(), hi == image.max()
  if (low_end or high_end) and (rest := image[(image > lo if low_end else True) &
                                              (image < hi if high_end else True)]).size:
    rest_lo, rest_hi = np.percentile(rest, (0.5, 99.5))
    low_fill = low_end and rest_lo - lo > rest_hi - rest_lo
    high_fill = high_end and hi - rest_hi > rest_hi - rest_lo
    if low_fill or high_fill:
      lo, hi = np.percentile(image[(image > lo if low_fill else True) & (image < hi if high_fill else True)],
                             (0.5, 99.5))
  if hi <= lo:
    lo, hi = image.min(), image.max()
  return np.clip((image - lo) / max(hi - lo, np.finfo(np.float32).tiny), 0, 1).astype(np.float16)


def padded_size(n: int, multiple: int) -> int:
  """n rounded up to a multiple of `multiple` (the network's stride)."""
  return -(-n // multiple) * multiple


def centred_padding(n: int, size: int) -> tuple[int, int]:
  """(before, after) zero padding that centres n pixels in `size`."""
  return (size - n) // 2, size - n - (size - n) // 2


def _case_done(progress: Progress, what: str) -> None:
  progress.update()
  logging.info('%s: %s', progress.status('preprocess'), what)


def _skip(skipped: dict[str, str], case_id: str, error: DataError) -> None:
  logging.warning('case %s skipped: %s', case_id, error)
  skipped[case_id] = str(error)


def _case_slices(case: volumes.Case, label_map: Sequence[Sequence[int]], synth_tissues: bool,
                 keep_empty: bool, with_images: bool, out: pathlib.Path
                 ) -> tuple[list[dict], tuple[int, int]] | DataError:
  """Writes one case's slices, unpadded, as <id>.<kind>.tmp.npy files into `out` and returns their index
  entries (their 'pad' left to `_write_splits`) and in-plane shape, or the DataError that skips the case
  (returned, not raised: a worker process's other cases go on). Without `with_images` (data.synth's
  training split) its image is neither read nor synthesised."""
  try:
    if case.image is None or not with_images:
      source, spacing = volumes.load_labels(case, label_map)
      labels = volumes.remap_labels(source, label_map)
    else:
      image, labels, spacing = volumes.load_case(case, label_map)
    volumes.check_has_cartilage(labels, case.label, label_map)
    tissue = _tissues(case, label_map) if synth_tissues else None
    if case.image is None and with_images:
      image = synthetic_image(tissue, case.id)
  except DataError as e:
    return e
  cartilage = labels.reshape(len(labels), -1).any(axis=1)
  rows = np.arange(len(labels)) if keep_empty else np.flatnonzero(cartilage)
  if with_images:
    np.save(out / f'{case.id}.images.tmp.npy', normalise(image)[rows])
  np.save(out / f'{case.id}.labels.tmp.npy', labels[rows])
  if tissue is not None:
    np.save(out / f'{case.id}.tissues.tmp.npy', tissue[rows])
  return [{'case': case.id, 'slice': int(r), 'spacing': [spacing[1], spacing[2]],
           'sagittal_spacing': spacing[0], 'cartilage': bool(cartilage[r])} for r in rows], labels.shape[1:]


def _jax_on_cpu() -> None:
  """A worker's JAX (`synthetic_image`) on the CPU: the GPUs are the training process's."""
  jax.config.update('jax_platforms', 'cpu')


def _kinds(split: str, data_cfg: ml_collections.ConfigDict) -> list[str]:
  """The arrays of a split of the store: data.synth trains on images drawn from the tissue maps."""
  with_images = split != 'train' or not data_cfg.synth
  return ['images'] * with_images + ['labels'] + ['tissues'] * data_cfg.synth


def _write_splits(store: pathlib.Path, split_cases: dict[str, list[volumes.Case]],
                  data_cfg: ml_collections.ConfigDict, multiple: int, skipped: dict[str, str],
                  workers: int) -> dict[str, list[str]]:
  """Each split's slices under store/<split>/, every case's in one of `workers` processes (`_case_slices`),
  centred in one slice size for all splits: the largest of the cases written (not of those skipped), padded
  to a multiple of `multiple`; returns the ids written per split. A case failing its checks is skipped
  whole: per-case temporary files are written only after its checks pass, and give the row count before the
  memmap."""
  jobs, parts, index, kinds = [], {}, {}, {}
  label_map = tuple(map(tuple, data_cfg.label_map))
  for name, cases in split_cases.items():
    (store / name).mkdir()
    keep_empty = name != 'train' or data_cfg.train_slices == 'all'
    kinds[name] = _kinds(name, data_cfg)
    with_images = 'images' in kinds[name]
    jobs += [(name, (case, label_map, data_cfg.synth, keep_empty, with_images, store / name))
             for case in cases]
    parts[name], index[name] = [], []
  progress = Progress(len(jobs))
  results = map_in_order(_case_slices, [job for _, job in jobs], workers, initializer=_jax_on_cpu)
  shapes = {}  # of the cases written
  for (name, (case, *_)), result in zip(jobs, results, strict=True):
    if isinstance(result, DataError):
      _skip(skipped, case.id, result)
      _case_done(progress, f'{case.id} skipped')
      continue
    rows, shapes[case.id] = result
    parts[name].append(case.id)
    index[name] += rows
    _case_done(progress, f'{case.id}: {len(rows)} slices')
  size = (tuple(padded_size(max(n), multiple) for n in zip(*shapes.values())) if shapes else
          (multiple, multiple))
  for row in (row for rows in index.values() for row in rows):
    row['pad'] = [centred_padding(n, target) for n, target in zip(shapes[row['case']], size)]
  for name in split_cases:
    _gather(store / name, parts[name], index[name], kinds[name], size)
    (store / name / 'index.json').write_text(json.dumps(index[name]))
  return parts


def _reserve(path: pathlib.Path) -> None:
  """Allocates the disk space of a file made sparse (a new memory map): a full disk then raises here, not
  a bus error that ends the process as the map is written. Where the system cannot (macOS, some network
  file systems), the file stays as it is."""
  if not hasattr(os, 'posix_fallocate'):
    return
  with open(path, 'r+b') as f:
    try:
      os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
      if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
        raise


def _gather(out: pathlib.Path, parts: Sequence[str], rows: Sequence[dict], kinds: Sequence[str],
            size: tuple[int, int]) -> None:
  """The split's per-case temporary files, in `parts` order, into one .npy file per kind ('images',
  'labels', 'tissues') of slices of `size`, each case's at its rows' 'pad' (the rest zero)."""
  for kind in kinds:
    dtype = np.float16 if kind == 'images' else np.uint8
    if not rows:  # an empty split: np.memmap cannot map zero bytes
      np.save(out / f'{kind}.npy', np.zeros((0, *size), dtype))
      continue
    # A new file's bytes are zeros: the padding.
    array = np.lib.format.open_memmap(out / f'{kind}.npy', mode='w+', dtype=dtype, shape=(len(rows), *size))
    _reserve(out / f'{kind}.npy')
    start = 0
    for case_id in parts:
      tmp = out / f'{case_id}.{kind}.tmp.npy'
      part = np.load(tmp, mmap_mode='r')
      (top, _), (left, _) = rows[start]['pad']  # a case written has a row: a slice with cartilage at least
      array[start:start + len(part), top:top + part.shape[1], left:left + part.shape[2]] = part
      start += len(part)
      del part
      tmp.unlink()
    array.flush()
    del array


def _no_usable_case(root: str, total: int) -> DataError:
  return DataError(f'{root}: no usable case, all {total} skipped (see the warnings above)')


def _usable(cases: Sequence[volumes.Case], skipped: dict[str, str], synth: bool) -> list[volumes.Case]:
  """The cases with a label (and an image, unless `synth`) whose headers pass the cheap checks; the others
  go to skipped."""
  usable = []
  for case in cases:
    try:
      if case.label is None:
        raise DataError(f'no label file for {case.image.name}')
      if case.image is None and not synth:
        raise DataError(f'no image file for {case.label.name} (a label map alone trains only with '
                        'data.synth=True)')
      volumes.check_headers(case)
      usable.append(case)
    except DataError as e:
      _skip(skipped, case.id, e)
  return usable


def _names(names: Sequence[str]) -> str:
  return ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')


def _damaged(store: pathlib.Path, data_cfg: ml_collections.ConfigDict) -> str:
  """What of an up-to-date store is missing or cut short (a disk that filled, a copy broken off), '' when
  every file is whole: each split's arrays hold as many rows as its index."""
  try:
    for path in (store / 'skipped.json', store / 'splits.json'):
      json.loads(path.read_text())
    for name in SPLITS:
      path = store / name / 'index.json'
      rows = len(pipeline.read_index(path.parent))
      for kind in _kinds(name, data_cfg):
        path = store / name / f'{kind}.npy'
        if len(np.load(path, mmap_mode='r')) != rows:
          return f'{path} holds other rows than its index.json'
  except (OSError, ValueError, EOFError) as e:  # missing; cut short: fails to map, or to parse
    return f'{path} is missing or cut short: {one_line(e)}'
  return ''


def ensure_slice_store(data_cfg: ml_collections.ConfigDict, cache_dir: str | pathlib.Path, seed: int, *,
                       multiple: int, check_splits: Callable[[dict, bool], Any] | None = None
                       ) -> pathlib.Path:
  """Builds the slice store of the volumes under data_cfg.root in cache_dir, or reuses it if up to date.
  Its slices are padded to a common size, a multiple of `multiple` (the network's stride). A new store's
  splits are given to `check_splits`, with whether the one there was built from the same source files,
  before it replaces that one: what that raises leaves it as it was.

  Bad cases are named in one warning each and skipped (listed in skipped.json); none usable is a DataError.
  """
  if data_cfg.train_slices not in ('cartilage', 'all'):
    raise ConfigError(f"data.train_slices: expected 'cartilage' or 'all', got {data_cfg.train_slices!r}")
  cache_dir = pathlib.Path(cache_dir).resolve()  # a link to a folder elsewhere: the store is built there
  if pathlib.Path.cwd().is_relative_to(cache_dir):
    raise ConfigError(f'data.cache_dir: {cache_dir} holds the current folder, which building the store would '
                      'replace; name a folder of its own')
  # What killed runs left beside the store (their builds, the stores they were replacing: `atomic.mark`),
  # also where the store is current: a killed rebuild's is as large.
  atomic.remove_left_by_dead(cache_dir.parent, f'{cache_dir.name}.')
  cases = volumes.discover_cases(data_cfg.root)
  volumes.check_dataset_json(data_cfg.root, data_cfg.label_map)
  fingerprint = _fingerprint(cases, data_cfg, seed, multiple)
  old_path = cache_dir / 'fingerprint.json'
  old = {}
  foreign = sorted(p.name for p in cache_dir.iterdir() if p.name not in _STORE_ENTRIES) if (
      cache_dir.is_dir()) else []
  if old_path.exists():
    try:
      old = json.loads(old_path.read_text())
      damaged = _damaged(cache_dir, data_cfg) if old == fingerprint else ''
    except (OSError, ValueError) as e:
      old, damaged = {}, f'{old_path} is cut short: {one_line(e)}'
    if old == fingerprint and not damaged:
      skipped = json.loads((cache_dir / 'skipped.json').read_text())
      logging.info('slice store %s is up to date, reused (%d cases were skipped: %s)', cache_dir,
                   len(skipped), cache_dir / 'skipped.json')
      return cache_dir
    # A build replaces the folder whole: a workdir or other files put in it since would go with it.
    if foreign:
      raise DataError(f'slice store folder {cache_dir}: holds {_names(foreign)} beside its slice store, '
                      'which rebuilding the store would delete; move them out, or name another folder '
                      '(data.cache_dir)')
    changed = ['source files'] if old.get('sources') != fingerprint['sources'] else []
    old_settings = old.get('settings', {})
    changed += [k for k in sorted(old_settings.keys() | fingerprint['settings'].keys())
                if old_settings.get(k) != fingerprint['settings'].get(k)]
    if not damaged and old.get('version', 1) != STORE_VERSION:  # its settings as that version wrote them
      damaged = (f'built by another version of easunet_jax: store version {old.get("version", 1)}, this one '
                 f'builds {STORE_VERSION}')
    logging.info('slice store %s is stale (%s), rebuilding', cache_dir,
                 damaged or f'changed: {", ".join(changed)}')
  elif foreign:  # a build replaces the folder, whatever it holds
    raise DataError(f'slice store folder {cache_dir}: holds {_names(foreign)} and no slice store (no '
                    'fingerprint.json), which building the store would delete; name a new or empty folder '
                    '(data.cache_dir)')
  elif cache_dir.is_dir() and any(p.name in SPLITS for p in cache_dir.iterdir()):
    raise DataError(f'slice store folder {cache_dir}: a slice store without its fingerprint.json (removed, '
                    'or a copy broken off), or a folder of other data; remove it to build the store anew, or '
                    'name another folder (data.cache_dir)')
  skipped = {}
  usable = _usable(cases, skipped, data_cfg.synth)
  if not usable:
    raise _no_usable_case(data_cfg.root, len(cases))
  ids = [c.id for c in usable]
  splits = (_read_split_file(data_cfg.split_file, data_cfg.root, ids, list(skipped)) if data_cfg.split_file
            else split_cases(ids, data_cfg.split, seed))
  # One volume open at a time: a compressed MetaImage's or NRRD's voxels are read as it opens.
  shapes, affines, stored = zip(*((*volumes.canonical_grid(nii), nii.affine)
                                  for nii in map(volumes.open_volume, (c.image or c.label for c in usable))))
  shapes = np.array(shapes)
  # What a conversion that lost the geometry writes: the slices are taken along the first stored axis as
  # left-right, which only a sagittal scan stored slice first makes sagittal.
  if lost := [c.id for c, affine in zip(usable, stored) if np.array_equal(affine[:3, :3], np.eye(3))]:
    logging.warning("%d case(s) with the identity for their header's voxel-to-world affine (1 mm voxels, "
                    'axes as stored, as a conversion that lost the geometry writes it): %s; they are sliced '
                    'along their first axis as sagittal, at 1 mm', len(lost),
                    ', '.join(lost[:5]) + (', ...' if len(lost) > 5 else ''))
  by_id = {c.id: c for c in usable}
  # Build beside the target and rename at the end, so a crash or a skip never leaves a half-written store.
  tmp, aside = (cache_dir.with_name(atomic.mark(f'{cache_dir.name}.') + kind) for kind in ('build', 'old'))
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
  except OSError as e:  # named as the store, not as the build folder the user never asked for
    raise DataError(f'{cache_dir}: cannot build the slice store there ({e.strerror})') from None
  try:
    # Cases in parallel where there is much to do. At most 8 processes (nnU-Net's default), each holding
    # one volume and its transforms (~2 GB at OAI-ZIB's size).
    workers = min(cpus(), 8) if shapes.prod(axis=1).sum() >= _PARALLEL_MIN_VOXELS else 1
    written = _write_splits(tmp, {name: [by_id[i] for i in splits[name]] for name in SPLITS}, data_cfg,
                            multiple, skipped, workers)
    if any(written.values()) and not data_cfg.split_file and (
        emptied := [name for name in SPLITS if splits[name] and not written[name]]):
      # The checks that read the voxels (label values, a truncated file) skipped every case of a split that
      # the headers' checks had given cases: the cases that passed are split again, and written again.
      ids = [i for i in ids if i not in skipped]
      logging.warning('the cases of the %s split were all skipped: the %d cases that passed are split again',
                      ' and '.join(emptied), len(ids))
      shutil.rmtree(tmp)
      tmp.mkdir()
      written = _write_splits(tmp, {name: [by_id[i] for i in cases] for name, cases in
                                    split_cases(ids, data_cfg.split, seed).items()}, data_cfg, multiple,
                              skipped, workers)
    splits = written
    if not any(splits.values()):
      raise _no_usable_case(data_cfg.root, len(cases))
    # The store keeps each scan's pixel (no resampling), and a model learns one scale: say where the cases
    # written differ, per axis, scan against scan (one pixel that is not square is one scale).
    kept = {i for ids in splits.values() for i in ids}
    pixels = np.array([nib.affines.voxel_sizes(affine)[1:] for c, affine in zip(usable, affines)
                       if c.id in kept])
    if np.any(pixels.max(axis=0) > _PIXEL_SPREAD * pixels.min(axis=0)):
      logging.warning('the scans of %s have in-plane pixels from %s to %s mm, which the store keeps as '
                      'they are: the network learns slices at several scales and predict resamples to their '
                      'median; resample the scans to one pixel size for one scale', data_cfg.root,
                      *(' x '.join(f'{size:.3g}' for size in sizes) for sizes in (pixels.min(axis=0),
                                                                                   pixels.max(axis=0))))
    if check_splits:
      check_splits(splits, old.get('sources') == fingerprint['sources'])
    (tmp / 'splits.json').write_text(json.dumps(splits, indent=1))
    (tmp / 'skipped.json').write_text(json.dumps(skipped, indent=1))
    (tmp / 'fingerprint.json').write_text(json.dumps(fingerprint))
    # The stale store is moved aside before it is deleted, not deleted in place: a kill part way through
    # the deletion would leave half a store where the next run looks for one.
    shutil.rmtree(aside, ignore_errors=True)  # one a run of the same process id left (a container's)
    if cache_dir.exists():
      cache_dir.rename(aside)
    tmp.rename(cache_dir)
    shutil.rmtree(aside, ignore_errors=True)
  except OSError as e:
    # Writing the store: a full disk (numpy's message names no file), a folder made read-only meanwhile.
    if e.filename is not None and not pathlib.Path(e.filename).is_relative_to(tmp):
      raise
    raise DataError(f'{cache_dir}: cannot write the slice store ({e.strerror or one_line(e)}); make room '
                    'there, or name another folder (data.cache_dir)') from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  rows = {n: len(json.loads((cache_dir / n / 'index.json').read_text())) for n in SPLITS}
  logging.info('slice store %s built: %s slices; %d of %d cases skipped%s', cache_dir,
               ', '.join(f'{n} {rows[n]}' for n in SPLITS), len(skipped), len(cases),
               f' ({", ".join(skipped)}; reasons in skipped.json)' if skipped else '')
  return cache_dir


def prepare_data(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                 as_trained: bool = False) -> pathlib.Path:
  """The slice store of a run: data.root (or the phantom) preprocessed into data.cache_dir, its slices
  padded to the stride of config.model's network. With `as_trained` (a resumed training, an evaluation), a
  store rebuilt with another split of the cases than the workdir trained on (`pipeline.check_trained_on`)
  is refused before it replaces the one there."""
  cache_dir = config.data.cache_dir or pathlib.Path(workdir) / 'slices'
  if pathlib.Path(workdir).resolve().is_relative_to(pathlib.Path(cache_dir).resolve()):
    raise ConfigError(f'data.cache_dir: {cache_dir} holds the workdir {workdir}, which building the store '
                      'would replace; name a folder of its own')
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.root = str(resolve_data_root(config.data, workdir, config.seed))
  check = functools.partial(pipeline.check_trained_on, pathlib.Path(workdir), pathlib.Path(cache_dir))
  return ensure_slice_store(data_cfg, cache_dir, config.seed, multiple=models.stride(config.model.features),
                            check_splits=check if as_trained else None)


def write_split_file(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     path: pathlib.Path) -> None:
  """Writes the seeded subject split of data.root (or the phantom, generated here once) to `path`, a
  data.split_file that runs of other seeds can share. Every labelled case is split (with an image, unless
  data.synth); the stores drop the ones their checks reject."""
  root = resolve_data_root(config.data, workdir, config.seed)
  ids = [case.id for case in volumes.discover_cases(root)
         if case.label is not None and (case.image is not None or config.data.synth)]
  if not ids:
    raise DataError(f'{root}: no labelled case to split')
  atomic.write_text(path, json.dumps(split_cases(ids, config.data.split, config.seed), indent=1))
  logging.info('split written to %s', path)
