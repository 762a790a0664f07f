"""Segmentation losses: cross-entropy + soft Dice, and the deep-supervision weighting of side outputs."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from easunet_jax.errors import ConfigError


def soft_dice(probs_BHWK: jax.Array, onehot_BHWK: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per-class soft Dice (K,), sums over the whole batch: (2 sum(p g) + eps) / (sum p + sum g + eps)."""
  axes = tuple(range(probs_BHWK.ndim - 1))
  intersection = jnp.sum(probs_BHWK * onehot_BHWK, axis=axes)
  denominator = jnp.sum(probs_BHWK, axis=axes) + jnp.sum(onehot_BHWK, axis=axes)
  return (2 * intersection + eps) / (denominator + eps)


def segmentation_loss(logits_BHWK: jax.Array, labels_BHW: jax.Array, eps: float = 1e-5,
                      valid_B: jax.Array | None = None) -> jax.Array:
  """CE (mean over the pixels of the valid samples) + 1 - mean foreground soft Dice; float32 whatever the
  logits' dtype.

  valid_B, when given, drops the samples marked False (padding of a last, partial batch).
  """
  logits = logits_BHWK.astype(jnp.float32)
  weights = jnp.ones(labels_BHW.shape, jnp.float32)
  if valid_B is not None:
    weights = weights * valid_B.astype(jnp.float32)[:, None, None]
  onehot = jax.nn.one_hot(labels_BHW, logits.shape[-1], dtype=jnp.float32)
  # The one-hot form of the cross-entropy: optax's integer-label version differentiates into a scatter
  # that XLA:CPU spends seconds compiling, once per loss term (five per EAS U-Net step).
  ce_pixels = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)
  ce = jnp.sum(ce_pixels * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  dice = soft_dice(jax.nn.softmax(logits) * weights[..., None], onehot * weights[..., None], eps)
  return ce + 1.0 - dice[1:].mean()


def deep_supervision_loss(final_BHWK: jax.Array, sides: Sequence[jax.Array], labels_BHW: jax.Array,
                          side_weights: Sequence[float], eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
  """(total, loss_final): loss(final) + sum_i w_i loss(side_i), sides already at full resolution.

  The i-th side output takes the i-th weight: EAS U-Net's sides are d1..d4, U-Net++'s (with
  model.deep_supervision) the heads on X^{0,1}, X^{0,2}, X^{0,3}, so it needs three weights (Zhou 2018 weighs
  them equally: (1, 1, 1)). A network without side outputs (an empty `sides`) uses no weight.
  """
  if sides and len(sides) != len(side_weights):
    raise ConfigError(f'{len(sides)} side outputs but {len(side_weights)} loss.side_weights')
  loss_final = segmentation_loss(final_BHWK, labels_BHW, eps)
  total = loss_final
  for weight, side in zip(side_weights, sides):
    total = total + weight * segmentation_loss(side, labels_BHW, eps)
  return total, loss_final
