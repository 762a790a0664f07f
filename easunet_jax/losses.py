"""Segmentation losses: cross-entropy + soft Dice, and the deep-supervision weighting of side outputs."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from easunet_jax.errors import ConfigError


def loss_sums(logits_BHWK: jax.Array, labels_BHW: jax.Array, valid_BHW: jax.Array | None = None
              ) -> dict[str, jax.Array]:
  """The sums the loss is made of, over a batch's pixels (those valid_BHW marks, when given: a slice's
  own, not the store's padding nor a partial batch's padded rows), in float32 whatever the logits' dtype:
  'ce' and 'pixels' (), and the soft Dice's 'intersection' sum(p g) and 'denominator' sum p + sum g (K,).
  Summed over batches, they give the loss of all as one batch (`loss_of_sums`), however they were batched."""
  logits = logits_BHWK.astype(jnp.float32)
  weights = jnp.ones(labels_BHW.shape, jnp.float32) if valid_BHW is None else valid_BHW.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels_BHW, logits.shape[-1], dtype=jnp.float32) * weights[..., None]
  # The one-hot form of the cross-entropy: optax's integer-label version differentiates into a scatter
  # that XLA:CPU spends seconds compiling, once per loss term (five per EAS U-Net step).
  ce_pixels = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)
  probs = jax.nn.softmax(logits) * weights[..., None]
  axes = (0, 1, 2)
  return {'ce': jnp.sum(ce_pixels * weights), 'pixels': jnp.sum(weights),
          'intersection': jnp.sum(probs * onehot, axis=axes),
          'denominator': jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)}


def loss_of_sums(sums: dict[str, jax.Array], eps: float = 1e-5) -> jax.Array:
  """CE (mean over the pixels) + 1 - mean foreground soft Dice (2 sum(p g) + eps) / (sum p + sum g + eps),
  from `loss_sums`' sums: a class absent from labels and prediction scores Dice 1, no penalty."""
  dice = (2 * sums['intersection'] + eps) / (sums['denominator'] + eps)
  return sums['ce'] / jnp.maximum(sums['pixels'], 1.0) + 1.0 - dice[1:].mean()


def segmentation_loss(logits_BHWK: jax.Array, labels_BHW: jax.Array, eps: float = 1e-5,
                      valid_BHW: jax.Array | None = None) -> jax.Array:
  """CE + soft Dice of a batch, its sums over the whole batch (`loss_sums`, `loss_of_sums`)."""
  return loss_of_sums(loss_sums(logits_BHWK, labels_BHW, valid_BHW), eps)


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
