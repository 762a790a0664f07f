"""Contrast synthesis: images drawn from tissue maps differ in contrast between draws and keep the labels;
tissue maps derived from label maps; training from label maps alone in the OAI-ZIB layout (images/ +
labels/, and ZIB's own release of MetaImage files) and nnU-Net's."""

import functools
import json

import jax
import metaimage
import numpy as np
import pytest

from configs import tiny
from easunet_jax import evaluate, steps, train
from easunet_jax.data import augment, phantom, pipeline, preprocess, synth, volumes
from easunet_jax.errors import DataError


@pytest.fixture(scope='module')
def knee():
  """A schematic phantom's tissue codes and labels (16 slices of 64 x 64)."""
  _, tissue, _ = phantom.make_tissues(2, (16, 64, 64), (7.0, 1.0, 1.0))
  return tissue, phantom.LABEL_OF_TISSUE[tissue]


@functools.cache
def _batch_fn(augment_batch: bool):
  ranges = augment.Ranges() if augment_batch else None
  return jax.jit(functools.partial(steps.training_batch, augment_ranges=ranges, synthesise=True))


# A draw of the sub-regions' means alone.
_PLAIN = {'spread': 0.0, 'blur_px': 0.0, 'bias': 0.0, 'log_gamma': 0.0, 'noise': (0.0, 0.0),
          'saturation': (1.0, 1.0)}


def _tissue_means(image, tissue):
  return np.array([image[tissue == code].mean() for code in (phantom.FAT, phantom.MUSCLE, phantom.FEMUR,
                                                              phantom.FC, phantom.FLUID)])


def test_draws_differ_in_contrast_and_keep_the_labels(knee):
  tissue, labels = knee
  batch = {'image': np.zeros((*tissue.shape, 1), np.float16), 'label': labels, 'tissue': tissue}
  draws = [jax.device_get(_batch_fn(False)(batch, augment.step_key(0, step))) for step in range(3)]
  for draw in draws:
    np.testing.assert_array_equal(draw['label'], labels)  # labels exactly as given
    assert draw['image'].shape == (*tissue.shape, 1) and draw['image'].dtype == np.float32
    assert draw['image'].min() >= 0 and draw['image'].max() <= 1
  slice_ = 8
  means = [_tissue_means(d['image'][slice_, ..., 0], tissue[slice_]) for d in draws]
  # Each draw orders the tissues' brightness its own way: the contrast differs, not just the scale.
  orders = {tuple(np.argsort(m)) for m in means}
  assert len(orders) > 1, means
  assert np.abs(means[0] - means[1]).max() > 0.1
  # The same key draws the same image.
  again = jax.device_get(_batch_fn(False)(batch, augment.step_key(0, 0)))
  np.testing.assert_array_equal(again['image'], draws[0]['image'])


def test_a_volumes_fixed_image_draws_each_slice_by_its_index_in_one_program(knee):
  """A labels-only set's validation and test images: slice i is drawn alike whatever the slice count, and
  one compilation serves every slice count of an in-plane size."""
  tissue, _ = knee
  whole = preprocess.synthetic_image(tissue, 'case')
  assert whole.shape == tissue.shape and whole.dtype == np.float32 and 0 <= whole.min() < whole.max() <= 1
  compiled = preprocess._render_slices._cache_size()
  np.testing.assert_array_equal(preprocess.synthetic_image(tissue[:11], 'case'), whole[:11])
  assert preprocess._render_slices._cache_size() == compiled
  assert not np.array_equal(preprocess.synthetic_image(tissue, 'other case'), whole)


def test_air_is_dark_in_the_draws_ranges_say(knee):
  """All else plain (no spread, blur, bias, gamma, noise or saturation), the image is the sub-regions'
  means over the brightest's: air drawn in [0, 0.1] is then below 0.2 (the brightest of some twenty means is
  over 0.5) in every draw; air drawn as a tissue is above it in most."""
  tissue = knee[0][8].copy()
  tissue[:16] = 0  # air beside the leg (the phantom's leg fills its slices)

  def air_means(dark_air):
    draw = jax.jit(lambda key: synth.render(key, tissue, synth.Ranges(dark_air=dark_air, **_PLAIN)))
    return np.array([np.asarray(draw(jax.random.key(i)))[tissue == 0].mean() for i in range(20)])

  assert (air_means(1.0) < 0.2).all()
  assert (air_means(0.0) > 0.2).sum() >= 10


def test_the_blur_smooths_both_axes_and_the_noise_is_rician():
  """One tissue's white within-region noise under a blur of up to 50 pixels: as smooth from column to
  column as from row to row (blurred along one axis only, 3x rougher). On dark air, noise of sigma 0.1
  adds 2 sigma^2 to the mean square, as a complex signal's magnitude does (its real part's alone: sigma^2)."""
  plain = {'bias': 0.0, 'log_gamma': 0.0, 'noise': (0.0, 0.0), 'saturation': (1.0, 1.0)}
  tissue = np.full((64, 64), 5, np.int32)
  for seed in range(8):
    image = np.asarray(synth.render(jax.random.key(seed), tissue, synth.Ranges(spread=0.3, blur_px=50.0,
                                                                                **plain)))
    across, down = (np.abs(np.diff(image, axis=axis)).mean() for axis in (1, 0))
    assert 0.6 < across / down < 1.6, (seed, across / down)
  tissue = np.zeros((64, 64), np.int32)
  tissue[32:] = 3  # marrow beside dark air
  air = tissue == 0
  for seed in range(4):
    clean, noisy = (np.asarray(synth.render(jax.random.key(seed), tissue, synth.Ranges(
        dark_air=1.0, **_PLAIN | {'noise': (sigma, sigma)})))[air] for sigma in (0.0, 0.1))
    assert 1.7 < np.mean(noisy ** 2 - clean ** 2) / 0.1 ** 2 < 2.3, seed


def test_the_smooth_field_changes_up_to_the_slices_edges():
  """The field that splits tissues and biases the image slopes in every pixel, the edges' too: a field held
  flat at the edges would split them along straight lines at right angles to the border."""
  for seed in range(4):
    field = np.asarray(synth._smooth_field(jax.random.key(seed), (96, 80)))
    assert np.abs(np.diff(field, axis=0)).min() > 0 and np.abs(np.diff(field, axis=1)).min() > 0, seed


def test_one_tissue_is_two_sub_regions_the_brighter_at_one():
  """All else plain, a slice of one tissue is its two sub-regions' means over the brighter's: two values,
  the larger 1 (the store's normalisation), in the draws where the smooth field splits it."""
  draw = jax.jit(lambda key: synth.render(key, np.full((64, 64), 5, np.int32), synth.Ranges(**_PLAIN)))
  values = [np.unique(np.round(np.asarray(draw(jax.random.key(i))), 5)) for i in range(8)]
  assert all(v.max() == pytest.approx(1.0, abs=1e-5) for v in values)
  assert {len(v) for v in values} == {1, 2}, values  # some draws leave the tissue whole


def test_augmentation_moves_tissue_and_labels_together(knee):
  tissue, labels = knee
  batch = {'label': labels.astype(np.int32), 'tissue': tissue.astype(np.int32)}
  params = augment.sample_parameters(jax.random.key(5), len(labels))
  out = jax.device_get(jax.jit(augment.apply)(params, batch))
  assert not np.array_equal(out['label'], labels)  # moved
  # One nearest-neighbour resample for both: the moved tissue map still gives the moved labels.
  np.testing.assert_array_equal(phantom.LABEL_OF_TISSUE[out['tissue']], out['label'])
  # And the training batch's labels are those moved labels.
  full = {'image': np.zeros((*tissue.shape, 1), np.float16), 'label': labels, 'tissue': tissue}
  drawn = jax.device_get(_batch_fn(True)(full, augment.step_key(0, 5)))
  augment_key, synth_key = jax.random.split(augment.step_key(0, 5))  # the other half draws the contrast
  moved = jax.device_get(jax.jit(augment.apply)(augment.sample_parameters(augment_key, len(labels)), batch))
  np.testing.assert_array_equal(drawn['label'], moved['label'])
  np.testing.assert_allclose(drawn['image'], jax.jit(synth.render_batch)(synth_key, moved['tissue']),
                             atol=1e-5)


@pytest.mark.parametrize('pixel_mm', [1.0, 1.7])  # 1.7: pixels coarser than the rim's 0.8 mm + half a pixel
def test_tissues_from_labels_codes_rims_and_bands(pixel_mm):
  labels = np.zeros((4, 40, 40), np.uint8)
  labels[:, 10:20, 10:30] = 1  # femur
  labels[:, 20:22, 10:30] = 2  # femoral cartilage
  labels[:, 30:32, 15:25] = 7  # another structure, e.g. a meniscus label
  labels[:, 34:36, 15:25] = 8  # and one more: a contrast of its own
  tissue = synth.tissues_from_labels(labels, (3.0, pixel_mm, pixel_mm), ((2, 1), (4, 2)))
  assert tissue.dtype == np.uint8 and tissue.max() < synth.NUM_TISSUES
  assert (tissue[labels == 2] == phantom.FC).all()
  assert (tissue[:, 11:19, 11:29] == phantom.FEMUR).all()  # marrow inside
  assert (tissue[:, 10, 10:30] == phantom.FEMUR_PLATE).all()  # the rim: one voxel
  assert (tissue[:, 11:19, 10] == phantom.FEMUR_PLATE).all()
  for value in (7, 8):
    other = tissue[labels == value]
    assert len(set(other)) == 1 and other[0] not in tissue[labels != value]
  # Background bands: farther from the labelled structures, a higher code.
  row = tissue[0, 15, 0:10][::-1]  # from next to the femur outwards
  assert (np.diff(row.astype(int)) >= 0).all() and row[-1] > row[0]
  # Another numbering (femoral cartilage 1, tibial cartilage 7): the cartilage by data.label_map, and the
  # other labels, bones unknown, each a code of its own.
  renumbered = synth.tissues_from_labels(np.where(labels == 1, 3, np.where(labels == 2, 1, labels)),
                                         (3.0, pixel_mm, pixel_mm), ((1, 1), (7, 2)))
  assert (renumbered[labels == 2] == phantom.FC).all() and (renumbered[labels == 7] == phantom.TC).all()
  bone = renumbered[labels == 1]
  assert len(set(bone)) == 1 and bone[0] not in (phantom.FEMUR, phantom.FEMUR_PLATE, phantom.TIBIA)
  # SKM-TEA's numbering (1 patellar, 2 femoral, 3 medial tibial cartilage): 3 is cartilage, not tibia.
  skm_tea = synth.tissues_from_labels(np.where(labels == 7, 3, labels), (3.0, pixel_mm, pixel_mm),
                                      ((2, 1), (3, 2)))
  assert (skm_tea[labels == 7] == phantom.TC).all() and phantom.FEMUR_PLATE not in skm_tea


def test_background_bands_lie_at_their_distances_in_mm():
  """A row of 1.7 mm voxels from a labelled one: each voxel's band counts the band edges (1, 3, 8, 20 mm)
  its distance passes."""
  labels = np.zeros((1, 1, 20), np.uint8)
  labels[..., 0] = 7
  tissue = synth.tissues_from_labels(labels, (1.0, 1.0, 1.7), ((2, 1),))
  distance = np.arange(1, 20) * 1.7
  np.testing.assert_array_equal(tissue[0, 0, 1:],
                                synth._FIRST_BAND + np.searchsorted(synth._BANDS_MM, distance))


@pytest.mark.parametrize('layout', ['oai-zib', 'oai-zib release', 'nnunet'])
def test_training_from_label_maps_alone(layout, tmp_path):
  source = tmp_path / 'phantom'
  phantom.write_dataset(source, 4, (8, 32, 32), (3.5, 2.0, 2.0), seed=0)
  root = tmp_path / layout
  for path in sorted((source / 'labels').iterdir()):  # label maps only: no images, no tissue maps
    if layout == 'oai-zib release':  # ZIB's download: MetaImage files without a pose, axes L, P, S
      labels, spacing = volumes.load_labels(volumes.Case(path.name, None, path), ((2, 2), (4, 4)))
      case_id = volumes.volume_stem(path.name)
      metaimage.write(root / 'segmentation_masks' / f'{case_id}.segmentation_masks.mhd',
                      labels[::-1, ::-1], spacing=spacing)
    else:
      label_dir = root / ('labels' if layout == 'oai-zib' else 'labelsTr')
      label_dir.mkdir(parents=True, exist_ok=True)
      (label_dir / path.name).write_bytes(path.read_bytes())
  cases = volumes.discover_cases(root)
  assert [c.image for c in cases] == [None] * 4
  config = tiny.get_config()
  config.data.root = str(root)
  config.data.synth = True
  if layout != 'nnunet':
    store = preprocess.prepare_data(config, tmp_path / 'run')
    for split in ('val', 'test'):
      images = np.load(store / split / 'images.npy')
      tissues = np.load(store / split / 'tissues.npy')
      assert images.shape == tissues.shape and images.std() > 0  # synthesised validation and test images
    assert not (store / 'train' / 'images.npy').exists()  # the train step draws its own
    row = pipeline.SliceSource(store / 'train')[0]
    assert set(row) == {'label', 'tissue'}
  else:
    config.train.num_steps = 2
    state = train.train_and_evaluate(config, tmp_path / 'run')
    assert int(state.step) == 2
    out = evaluate.evaluate(config, tmp_path / 'run')
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['synthetic_images'] == metrics['num_volumes'] > 0
    n = metrics['num_volumes']
    assert (f'**{n} of the {n} test volumes have no image (label maps alone): they are scored on images '
            'synthesised') in (out / 'report.md').read_text()
  without = tiny.get_config()
  without.data.root = str(root)
  with pytest.raises(DataError, match='no usable case'):
    preprocess.prepare_data(without, tmp_path / 'refused')
