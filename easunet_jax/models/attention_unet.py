"""Attention U-Net (Oktay et al. 2018): a U-Net whose skips pass through additive attention gates."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import layers
from easunet_jax.models.unet import Output, UNet, check_input, network_output


class AttentionGate(nnx.Module):
  """Additive attention gate (Oktay 2018, eqs. 1-2), gated by the coarser decoder feature g.

  alpha = sigmoid(psi^T relu(W_x^T x + W_g^T g + b_g) + b_psi), computed on g's grid (half the skip's):
  W_x is a 2x2 stride-2 convolution of the skip x (the paper's down-sampling of x to the gating grid),
  W_g and psi are 1x1 convolutions with biases b_g, b_psi. alpha is resized bilinearly to the skip's grid
  and the gate returns x * alpha. The intermediate width is the skip's, as in Oktay's U-Net.
  """

  def __init__(self, skip_channels: int, gate_channels: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.skip_proj = nnx.Conv(skip_channels, skip_channels, kernel_size=(2, 2), strides=(2, 2),
                              padding='VALID', use_bias=False, dtype=dtype, rngs=rngs)
    self.gate_proj = layers.pointwise(gate_channels, skip_channels, dtype, rngs, use_bias=True)
    self.psi = layers.pointwise(skip_channels, 1, dtype, rngs, use_bias=True)

  def coefficients(self, skip_BHWC: jax.Array, gate_BhwG: jax.Array) -> jax.Array:
    """Attention coefficients (B, H, W, 1) in [0, 1] on the skip's grid."""
    alpha = jax.nn.sigmoid(self.psi(jax.nn.relu(self.skip_proj(skip_BHWC) + self.gate_proj(gate_BhwG))))
    # Half-pixel centres, as the side outputs of EAS U-Net.
    return jax.image.resize(alpha, skip_BHWC.shape[:3] + (1,), 'bilinear')

  def __call__(self, skip_BHWC: jax.Array, gate_BhwG: jax.Array) -> jax.Array:
    return skip_BHWC * self.coefficients(skip_BHWC, gate_BhwG)


class AttentionUNet(UNet):
  """U-Net whose decoder stage s concatenates gate_s(e_s, g) instead of e_s, g being the stage's input.

  Training mode returns (final, []) (no side outputs), evaluation mode the final (B, H, W, K) logits.
  """

  def __init__(self, *, features: tuple[int, ...] = (32, 64, 128, 256, 512), num_classes: int = 3,
               dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
    super().__init__(features=features, num_classes=num_classes, dtype=dtype, rngs=rngs)
    f = tuple(features)
    # gates[s] belongs to the skip e_{s+1}, like decoder[s]: index 0 is full resolution.
    self.gates = nnx.List([AttentionGate(f[s], f[s + 1], dtype=dtype, rngs=rngs) for s in range(len(f) - 1)])

  def __call__(self, x_BHWC: jax.Array) -> Output:
    check_input(x_BHWC, self.stride, 'AttentionUNet')
    *skips, x = self.encoder(x_BHWC.astype(self.dtype))
    for stage, gate, skip in zip(reversed(self.decoder), reversed(self.gates), reversed(skips)):
      x = stage(x, gate(skip, x))
    return network_output(self.head(x), [], self.deterministic)
