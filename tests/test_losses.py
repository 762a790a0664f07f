"""CE + soft Dice loss and the deep-supervision weighting (docs/design.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easunet_jax import losses
from easunet_jax.errors import ConfigError


def _labels(seed=0, shape=(2, 16, 16)):
  return np.random.default_rng(seed).integers(0, 3, shape)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape, np.float32)


def test_loss_is_zero_on_perfect_one_hot_logits():
  labels = _labels()
  logits = 100.0 * jax.nn.one_hot(labels, 3)
  assert float(losses.segmentation_loss(logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_dice_of_identical_masks_is_one_and_of_disjoint_masks_zero():
  labels = _labels()

  def dice(logits):
    sums = losses.loss_sums(logits, labels)
    return sums['intersection'] * 2 / sums['denominator']

  mask = jax.nn.one_hot(labels, 3)
  np.testing.assert_allclose(dice(100.0 * mask), 1.0, rtol=1e-6)
  shifted = jnp.roll(mask, 1, axis=-1)  # every pixel moved to another class
  np.testing.assert_allclose(dice(100.0 * shifted), 0.0, atol=1e-7)


def test_uniform_logits_give_log_k_cross_entropy_plus_dice_term():
  labels = _labels()
  loss = losses.segmentation_loss(jnp.zeros((2, 16, 16, 3)), labels)
  g = np.asarray(jax.nn.one_hot(labels, 3)).reshape(-1, 3)
  dice = (2 * g.sum(0) / 3 + 1e-5) / (g.shape[0] / 3 + g.sum(0) + 1e-5)
  np.testing.assert_allclose(loss, np.log(3) + 1 - dice[1:].mean(), rtol=1e-5)


def test_pixels_marked_invalid_do_not_change_the_loss():
  """A partial batch's padded sample and a slice's store padding (its border here)."""
  logits = _normal(1, (3, 8, 8, 3))
  labels = _labels(2, (3, 8, 8))
  valid = np.zeros((3, 8, 8), bool)
  valid[:2, 1:7, 2:8] = True
  padded = losses.segmentation_loss(logits, labels, valid_BHW=valid)
  np.testing.assert_allclose(padded, losses.segmentation_loss(logits[:2, 1:7, 2:8], labels[:2, 1:7, 2:8]),
                             rtol=1e-6)
  assert abs(float(padded) - float(losses.segmentation_loss(logits, labels))) > 0.01


def test_the_sums_of_batches_give_the_loss_of_all_as_one_batch():
  """A validation set's loss however it is batched: the sums of its batches, not the mean of their losses
  (soft Dice pools its sums over a batch), which differs."""
  logits = _normal(6, (5, 8, 8, 3))
  labels = _labels(7, (5, 8, 8))
  parts = [losses.loss_sums(logits[i:i + 2], labels[i:i + 2]) for i in (0, 2, 4)]
  summed = jax.tree.map(lambda *x: sum(x), *parts)
  whole = losses.segmentation_loss(logits, labels)
  np.testing.assert_allclose(losses.loss_of_sums(summed), whole, rtol=1e-6)
  mean_of_losses = np.average([losses.loss_of_sums(p) for p in parts], weights=(2, 2, 1))
  assert abs(mean_of_losses - float(whole)) > 1e-4


def test_deep_supervision_weights_side_losses():
  labels = _labels()
  final, *sides = _normal(3, (5, 2, 16, 16, 3))
  weights = (0.5, 0.25, 0.125, 0.0625)
  total, loss_final = losses.deep_supervision_loss(final, sides, labels, weights)
  expected = losses.segmentation_loss(final, labels) + sum(
      w * losses.segmentation_loss(s, labels) for w, s in zip(weights, sides))
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(loss_final, losses.segmentation_loss(final, labels), rtol=1e-6)
  # loss.dice_eps reaches every term.
  total, loss_final = losses.deep_supervision_loss(final, sides, labels, weights, eps=10.0)
  np.testing.assert_allclose(loss_final, losses.segmentation_loss(final, labels, 10.0), rtol=1e-6)
  np.testing.assert_allclose(total, loss_final + sum(
      w * losses.segmentation_loss(s, labels, 10.0) for w, s in zip(weights, sides)), rtol=1e-6)
  with pytest.raises(ConfigError, match='side_weights'):
    losses.deep_supervision_loss(final, sides[:3], labels, weights)


def test_bfloat16_logits_are_scored_in_float32():
  labels = _labels()
  logits = _normal(4, (2, 16, 16, 3))
  loss = losses.segmentation_loss(logits.astype(jnp.bfloat16), labels)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, losses.segmentation_loss(logits, labels), rtol=1e-2)


def test_a_network_without_side_outputs_scores_the_final_logits_alone():
  labels = _labels()
  final = _normal(5, (2, 16, 16, 3))
  total, loss_final = losses.deep_supervision_loss(final, [], labels, (0.5, 0.25, 0.125, 0.0625))
  np.testing.assert_allclose(total, losses.segmentation_loss(final, labels), rtol=1e-6)
  np.testing.assert_allclose(loss_final, total, rtol=1e-6)


def test_soft_dice_of_a_class_absent_from_labels_and_prediction_is_one():
  """A batch without cartilage, predicted without it: no penalty (Dice 1, not 0)."""
  background = jnp.zeros((2, 4, 4), int)
  assert float(losses.segmentation_loss(100.0 * jax.nn.one_hot(background, 3), background)) == pytest.approx(
      0.0, abs=1e-6)
