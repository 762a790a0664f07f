"""What the figures show: the Bland-Altman plot's bias and limits, the plates' colours, the slices drawn."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from easunet_jax import figures


@pytest.fixture
def drawn(monkeypatch):
  """The figures `figures._save` is given, kept open instead of written."""
  kept = []
  monkeypatch.setattr(figures, '_save', lambda fig, out, **layout: kept.append(fig))
  yield kept
  for fig in kept:
    plt.close(fig)


def test_bland_altman_draws_the_bias_and_its_limits_of_agreement(drawn, tmp_path):
  """Differences 0.5, 0, 0.5, 0.5 (the pairs of a NaN left out: an empty plate measures none): bias 0.375,
  SD 0.25, limits 0.375 ± 1.96 x 0.25."""
  truth, measured = [1, 2, 3, 4, np.nan, 5], [1.5, 2.0, 3.5, 4.5, 9, np.nan]
  figures.plot_bland_altman(truth, measured, ['FC'] * 6, 'mm', tmp_path / 'ba.png')
  ax = drawn[0].axes[0]
  np.testing.assert_allclose([line.get_ydata()[0] for line in ax.lines], [0.375, 0.865, -0.115])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      'FC', 'bias +0.38 mm', '+1.96 SD +0.86', '-1.96 SD -0.11']


def test_bland_altman_of_one_pair_draws_no_limits_and_of_none_says_so(drawn, tmp_path):
  figures.plot_bland_altman([2.0, np.nan], [2.5, 1.0], ['FC', 'TC'], 'mm', tmp_path / 'ba.png')
  assert [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()] == ['FC', 'bias +0.50 mm']
  figures.plot_bland_altman([2.0, 3.0], [np.nan, np.nan], ['FC', 'TC'], 'mm', tmp_path / 'ba.png')
  ax = drawn[1].axes[0]
  assert not ax.lines and ax.get_legend() is None
  assert [t.get_text() for t in ax.texts] == ['no region measured in both prediction and ground truth']


def test_fc_is_tinted_red_and_tc_blue():
  rgb = figures._overlay(np.full((1, 3), 0.5, np.float32), np.array([[0, 1, 2]]))[0]
  np.testing.assert_allclose(rgb[0], 0.5)  # background keeps its grey
  assert np.argmax(rgb[1]) == 0 and np.argmax(rgb[2]) == 2


def test_the_slices_drawn_show_the_labels_cartilage_too(drawn, tmp_path):
  """Predicted FC on slice 5 only, labelled TC on slices 30-32: the slices drawn include the labels'."""
  classes = np.zeros((40, 8, 8), np.uint8)
  classes[5] = 1
  labels = np.zeros_like(classes)
  labels[30:33] = 2
  image = np.random.default_rng(0).random(classes.shape)
  figures.plot_prediction_slices(image, classes, (1.0, 1.0, 1.0), 'knee', tmp_path / 's.png', labels=labels)
  titles = [ax.get_title() for ax in drawn[0].axes if ax.get_title()]
  assert titles[0] == 'sagittal slice 5 of 40' and any(t.startswith('sagittal slice 3') for t in titles[1:])
  # Numbered as the file's voxels, where they run the other way.
  figures.plot_prediction_slices(image, classes, (1.0, 1.0, 1.0), 'knee', tmp_path / 's.png', labels=labels,
                                 slice_numbers=range(39, -1, -1))
  assert next(ax.get_title() for ax in drawn[1].axes if ax.get_title()) == 'sagittal slice 34 of 40'


def test_slices_are_drawn_superior_up_and_anterior_right(drawn, tmp_path):
  classes = np.zeros((3, 8, 8), np.uint8)
  # FC along the anterior (axis 1) end of the most superior row (axis 2) of slice 1: a shape that a swap of
  # the two axes would draw elsewhere.
  classes[1, 5:, 7] = 1
  image = np.random.default_rng(0).random(classes.shape)
  figures.plot_prediction_slices(image, classes, (1.0, 1.0, 1.0), 'knee', tmp_path / 's.png')
  panel = drawn[0].axes[1].images[0].get_array()  # the prediction's
  red = panel[..., 0] - panel[..., 2] > 0.2  # grey has equal red and blue
  assert {tuple(p) for p in np.argwhere(red)} == {(0, 5), (0, 6), (0, 7)}  # top row, right end


def test_slices_are_drawn_at_the_scans_pixel_aspect(drawn, tmp_path):
  classes = np.zeros((3, 8, 4), np.uint8)
  classes[1] = 1
  image = np.random.default_rng(0).random(classes.shape)
  figures.plot_prediction_slices(image, classes, (1.0, 0.5, 2.0), 'knee', tmp_path / 's.png')
  assert drawn[0].axes[0].images[0].get_extent() == pytest.approx([0, 4.0, 0, 8.0])  # 4 mm AP, 8 mm SI


def test_overlays_show_the_image_the_label_and_the_prediction(drawn, tmp_path):
  """Labelled FC and predicted TC on one slice, each in the anterior (axis 0) end of the most superior row
  (axis 1): the label's panel tinted red there, the prediction's blue, superior up and anterior right."""
  image = np.full((4, 4), 0.5, np.float32)
  label, pred = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
  label[2:, 3], pred[2:, 3] = 1, 2
  figures.plot_overlays([{'image': image, 'label': label, 'pred': pred, 'case': 'k', 'slice': 3,
                          'pixel_mm': (1.0, 1.0)}], tmp_path / 'overlays.png')
  axes = drawn[0].axes[:3]
  assert [ax.get_title() for ax in axes] == ['k slice 3 from the left', 'label', 'prediction']
  for ax, channel in zip(axes[1:], (0, 2)):
    tinted = np.argmax(ax.images[0].get_array(), axis=-1) == channel
    tinted &= np.ptp(ax.images[0].get_array(), axis=-1) > 0.2  # grey has equal channels
    assert {tuple(p) for p in np.argwhere(tinted)} == {(0, 2), (0, 3)}  # top row, right end


def test_loss_curves_are_labelled_by_their_keys_beside_the_validation_dice_in_percent(drawn, tmp_path):
  rows = [{'step': 1, 'train/loss': 3.0, 'train/loss_final': 2.0},
          {'step': 2, 'val/loss': 1.0, 'val/dice_fc': 0.5, 'val/dice_tc': 0.25, 'val/dice_mean': 0.375},
          {'step': 4, 'val/loss': None, 'val/dice_fc': 0.75, 'val/dice_tc': 0.5, 'val/dice_mean': 0.625}]
  figures.plot_loss_curves(rows, tmp_path / 'loss.png')
  loss_ax, dice_ax = drawn[0].axes
  assert {line.get_label(): str(np.asarray(line.get_ydata()).tolist()) for line in loss_ax.lines} == {
      'train/loss (with side outputs)': '[3.0]', 'train/loss_final': '[2.0]',
      'val/loss': '[1.0, nan]'}  # a value logged as null (not finite) leaves a gap
  assert {line.get_label(): tuple(line.get_ydata()) for line in dice_ax.lines} == {
      'FC': (50.0, 75.0), 'TC': (25.0, 50.0), 'mean': (37.5, 62.5)}
  assert dice_ax.get_ylim() == (-2, 102)


def test_thickness_maps_are_anterior_up_the_femur_seen_from_below(monkeypatch, tmp_path):
  """Both plates' cartilage in the anterior columns of the lower axis-0 (medial) half: at the top of both
  maps, on the viewer's right from below (FC) and on the left from above (TC), on a scale up to the
  thickest (6 mm, above the 4 mm floor)."""
  kept = []
  monkeypatch.setattr(figures.matplotlib.figure.Figure, 'savefig', lambda fig, *args, **kw: kept.append(fig))
  thickness = np.zeros((10, 20, 6), np.float32)
  fc, tc = np.zeros(thickness.shape, bool), np.zeros(thickness.shape, bool)
  fc[:3, 15:, 4], tc[:3, 15:, 1] = True, True
  thickness[fc], thickness[tc] = 6.0, 2.0
  figures.plot_thickness_maps(thickness, {'fc': fc, 'tc': tc}, (1.0, 1.0, 1.0), ('medial', 'lateral'), 'knee',
                              tmp_path / 't.png')
  fc_ax, tc_ax = kept[0].axes[:2]
  for ax, columns, value in ((fc_ax, [7, 8, 9], 6.0), (tc_ax, [0, 1, 2], 2.0)):
    shown = ax.images[0].get_array()
    rows, cols = np.nonzero(~np.ma.getmaskarray(shown))
    assert set(rows) == {0, 1, 2, 3, 4} and set(cols) == set(columns), ax.get_title()
    assert shown.max() == value and ax.images[0].get_clim() == (0, 6.0)
  assert fc_ax.get_xlabel() == 'lateral  ←  mm  →  medial'
  assert tc_ax.get_xlabel() == 'medial  ←  mm  →  lateral'
  assert not fc_ax.texts and not tc_ax.texts
  tc[:] = False  # a plate the mask misses: its panel says so, not just blank
  figures.plot_thickness_maps(thickness * fc, {'fc': fc, 'tc': tc}, (1.0, 1.0, 1.0), ('medial', 'lateral'),
                              'knee', tmp_path / 't.png')
  assert [[t.get_text() for t in ax.texts] for ax in kept[1].axes[:2]] == [[], ['none found']]
