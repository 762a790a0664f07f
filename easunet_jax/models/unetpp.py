"""U-Net++ (Zhou et al. 2018): nested, densely connected skip pathways, optional deep supervision."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from easunet_jax.models import layers
from easunet_jax.models.unet import Encoder, Output, UpStage, check_input, network_output, stride


class UNetPlusPlus(nnx.Module):
  """Nodes X^{i,j} (level i, column j): X^{i,0} is the U-Net encoder; for j > 0, X^{i,j} =
  DoubleConv([X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})]) with a 2x2 transposed conv as `up`.

  The final logits come from a 1x1 head on X^{0,4}. With `deep_supervision`, X^{0,1}..X^{0,3} get their
  own heads, returned as the side outputs in training mode (Zhou's deep supervision; the loss weighs
  side i with loss.side_weights[i]); without it, training mode returns (final, []).
  """

  def __init__(self, *, features: tuple[int, ...] = (32, 64, 128, 256, 512), num_classes: int = 3,
               deep_supervision: bool = False, dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
    f = tuple(features)
    self.stride = stride(f)
    self.encoder = Encoder(1, f, dtype=dtype, rngs=rngs)  # one input channel: the scan
    # nested[j - 1][i] is X^{i,j}: up-samples X^{i+1,j-1} and concatenates the j nodes X^{i,0..j-1}.
    self.nested = nnx.List([
        nnx.List([UpStage(f[i + 1], f[i], num_skips=j, dtype=dtype, rngs=rngs) for i in range(len(f) - j)])
        for j in range(1, len(f))])
    # heads[-1] reads X^{0,4}; with deep supervision heads[j - 1] reads X^{0,j}.
    self.heads = nnx.List([layers.pointwise(f[0], num_classes, dtype, rngs, use_bias=True)
                           for _ in range(len(f) - 1 if deep_supervision else 1)])
    self.dtype = dtype
    self.deterministic = False  # set by model.train() / model.eval()

  def __call__(self, x_BHWC: jax.Array) -> Output:
    check_input(x_BHWC, self.stride, 'UNetPlusPlus')
    grid = [[e] for e in self.encoder(x_BHWC.astype(self.dtype))]  # grid[i][j] is X^{i,j}
    for j, column in enumerate(self.nested, start=1):
      for i, node in enumerate(column):
        grid[i].append(node(grid[i + 1][j - 1], *grid[i][:j]))
    top = grid[0][-len(self.heads):]  # the X^{0,j} that have a head, X^{0,4} last
    logits = [head(x) for head, x in zip(self.heads, top)]
    return network_output(logits[-1], logits[:-1], self.deterministic)
