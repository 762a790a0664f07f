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
  """Differences 0.5, 0, 0.5, 0.5 (a NaN pair left out): bias 0.375, SD 0.25, limits 0.375 ± 1.96 x 0.25."""
  truth, measured = [1, 2, 3, 4, np.nan], [1.5, 2.0, 3.5, 4.5, 9]
  figures.plot_bland_altman(truth, measured, ['FC'] * 5, 'mm', tmp_path / 'ba.png')
  ax = drawn[0].axes[0]
  np.testing.assert_allclose([line.get_ydata()[0] for line in ax.lines], [0.375, 0.865, -0.115])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      'FC', 'bias +0.38 mm', '+1.96 SD +0.86', '-1.96 SD -0.11']


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
