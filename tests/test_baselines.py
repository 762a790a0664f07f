"""The paper's baselines (U-Net, U-Net++, Attention U-Net) beside EAS U-Net: one training and evaluation path
for all, parameter counts at the default widths against closed-form sums over each paper's structure, and
the attention gate."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import attention_unet, eas, tiny, unet, unetpp
from easunet_jax import losses, parallel, steps
from easunet_jax.data import pipeline
from easunet_jax.models import MODELS, abstract_model
from easunet_jax.models.attention_unet import AttentionGate
from easunet_jax.models.unet import ConvBnAct, UpStage
from easunet_jax.models.unetpp import UNetPlusPlus

REPO = pathlib.Path(__file__).resolve().parents[1]


MODEL_CONFIGS = {'eas_unet': eas, 'unet': unet, 'unetpp': unetpp, 'attention_unet': attention_unet}


def _tiny_config(name: str):
  """configs/tiny.py with the model (name and side outputs) of the model's own config file."""
  config = tiny.get_config()
  model_cfg = MODEL_CONFIGS[name].get_config().model
  config.model.name, config.model.deep_supervision = model_cfg.name, model_cfg.deep_supervision
  return config


def _batch(batch_size=4, size=32):
  """A fixed training batch whose labels the image shows: a bright femoral and a dimmer tibial band, plus
  noise; in the slice store's dtypes, as the training loop sends them (so the EAS U-Net's step is tiny's
  training step, compiled once for the suite)."""
  rng = np.random.default_rng(0)
  rows = np.arange(size)[None, :, None] + rng.integers(-4, 5, (batch_size, 1, 1))
  label = np.where((rows >= 10) & (rows < 14), 1, np.where((rows >= 18) & (rows < 22), 2, 0))
  label = np.broadcast_to(label, (batch_size, size, size)).astype(np.uint8)
  image = (0.8 * (label == 1) + 0.5 * (label == 2) + 0.1 * rng.standard_normal(label.shape))
  return {'image': image[..., None].astype(np.float16), 'label': label}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_every_model_trains_and_evaluates_through_the_training_code_path(name):
  config = _tiny_config(name)
  mesh = parallel.make_mesh()  # all four devices, as training: the EAS U-Net step is tiny's, from the cache
  tx = steps.make_optimizer(config.optim, config.train.num_steps)
  train_graphdef, eval_graphdef, state = steps.create_train_state(config, tx, parallel.shardings(mesh)[1])
  p_train_step, p_eval_step = steps.jit_steps(config, train_graphdef, eval_graphdef, tx, mesh)
  data_sharding = parallel.shardings(mesh)[0]
  batch = pipeline.put_on_mesh(_batch(), data_sharding)

  train_losses = []
  for _ in range(config.train.num_steps):
    state, step_metrics = p_train_step(state, batch)
    train_losses.append(float(step_metrics.compute()['loss']))
  assert np.all(np.isfinite(train_losses))
  assert train_losses[-1] < train_losses[0], train_losses

  eval_batch = pipeline.put_on_mesh(
      {**_batch(), 'valid': np.ones((4, 32, 32), bool), 'mask': np.ones(4, bool)}, data_sharding)
  out = jax.device_get(p_eval_step(state, eval_batch))
  assert out['counts'].shape == (4, config.model.num_classes - 1, 3)
  assert np.isfinite(losses.loss_of_sums(out['loss_sums']))

  model = nnx.merge(train_graphdef, state.params, state.batch_stats)
  final, sides = nnx.eval_shape(lambda m, x: m(x), model, batch['image'])
  assert final.shape == (4, 32, 32, 3) and final.dtype == jnp.float32
  assert all(s.shape == final.shape and s.dtype == jnp.float32 for s in sides)
  with pytest.raises(ValueError, match='multiples of 4'):  # the tiny networks' stride
    nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 42, 32, 1), jnp.float32))


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _config_count(model_cfg) -> int:
  return _count(abstract_model(model_cfg))


def _default_count(name: str) -> int:
  """Parameters of the model of configs/<model>.py, at the default widths."""
  return _config_count(MODEL_CONFIGS[name].get_config().model)


# Closed-form parameter counts from each paper's structure: a k x k convolution has k*k*c_in*c_out weights
# (+ c_out biases), a BatchNorm 2C (scale, bias); 1 input channel, K = 3 classes.
def _conv(k, c_in, c_out, bias=False):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _double_conv(c_in, c_out):
  return _conv(3, c_in, c_out) + 2 * c_out + _conv(3, c_out, c_out) + 2 * c_out


def _up_node(c_in, c_out, num_skips):
  """2x2 transposed conv with bias, then a double conv over [up, skips]."""
  return _conv(2, c_in, c_out, bias=True) + _double_conv((num_skips + 1) * c_out, c_out)


F = (32, 64, 128, 256, 512)
ENCODER = sum(_double_conv(c_in, c_out) for c_in, c_out in zip((1,) + F, F))
HEAD = _conv(1, F[0], 3, bias=True)
UNET = ENCODER + sum(_up_node(F[s + 1], F[s], 1) for s in range(4)) + HEAD
# X^{i,j}, j = 1..4, i = 0..4-j, concatenates the j nodes X^{i,0..j-1} with the up-sampled X^{i+1,j-1}.
UNETPP = ENCODER + sum(_up_node(F[i + 1], F[i], j) for j in range(1, 5) for i in range(5 - j)) + HEAD
# One gate per skip: W_x (2x2 stride 2, no bias), W_g (1x1 + b_g), psi (1x1 to one channel + b_psi).
GATES = sum(_conv(2, F[s], F[s]) + _conv(1, F[s + 1], F[s], bias=True) + _conv(1, F[s], 1, bias=True)
            for s in range(4))


def test_parameter_counts_at_the_default_widths():
  assert UNET == 7_762_531 == _default_count('unet')
  assert UNETPP == 9_045_315 == _default_count('unetpp')
  assert UNET + GATES == 8_285_735 == _default_count('attention_unet')
  assert _default_count('eas_unet') < _default_count('unet')


def test_unetpp_deep_supervision_adds_a_head_on_each_of_x01_to_x03():
  model_cfg = unetpp.get_config().model
  model_cfg.deep_supervision = True
  model = abstract_model(model_cfg)
  assert _count(model) == UNETPP + 3 * HEAD
  model.train()
  final, sides = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
  assert final.shape == (2, 32, 32, 3) and [s.shape for s in sides] == [final.shape] * 3


def test_unetpp_nodes_are_nested_and_each_head_reads_its_own_node():
  """Three levels: the output read from X^{0,k} (the side output k = 1, the final logits k = 2) changes with
  the parameters of node X^{i,j} exactly where i + j <= k, as each node up-samples the node below it of the
  column before and concatenates every node of its row before it."""
  model = UNetPlusPlus(features=(4, 8, 16), deep_supervision=True, rngs=nnx.Rngs(0))
  model.train()
  graphdef, _ = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))

  @jax.jit
  def outputs(state):
    final, sides = nnx.merge(graphdef, state)(x)
    return jnp.stack([*sides, final])

  before = outputs(nnx.state(model))
  nodes = [(i, j) for j in range(1, 3) for i in range(3 - j)]
  reached = {k: [] for k in (1, 2)}
  for i, j in nodes:
    changed = nnx.clone(model)
    node = changed.nested[j - 1][i]
    nnx.update(node, jax.tree.map(lambda p: p + 0.5, nnx.state(node, nnx.Param)))
    moved = np.abs(outputs(nnx.state(changed)) - before).max(axis=(1, 2, 3, 4)) > 1e-4
    for k in reached:
      if moved[k - 1]:
        reached[k].append((i, j))
  assert reached == {k: [(i, j) for i, j in nodes if i + j <= k] for k in reached}


def test_a_baseline_block_is_relu_and_its_up_stage_puts_the_up_sampled_map_before_the_skip():
  block = ConvBnAct(1, 1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.eval()
  block.conv.kernel[...] = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
  np.testing.assert_allclose(block(jnp.array([-1.0, 2.0]).reshape(1, 1, 2, 1)).ravel(), [0.0, 2.0], atol=1e-4)
  stage = UpStage(4, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  seen = []
  stage.block = seen.append
  x = jax.random.normal(jax.random.key(0), (1, 2, 2, 4))
  skip = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))
  stage(x, skip)
  np.testing.assert_allclose(seen[0], jnp.concatenate([stage.up(x), skip], axis=-1))


def test_attention_unet_passes_each_skip_through_its_gate():
  """Other gate weights give other logits: a network that skipped its gates would be a plain U-Net."""
  model = MODELS['attention_unet'](features=(4, 8, 16), rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 1))
  before = model(x)
  for gate in model.gates:
    nnx.update(gate, jax.tree.map(lambda p: p * 2 + 0.5, nnx.state(gate, nnx.Param)))
    after = model(x)
    assert not np.allclose(after, before, atol=1e-4)
    before = after


def test_attention_gate_scales_the_skip_by_coefficients_in_0_1():
  gate = AttentionGate(4, 8, dtype=jnp.float32, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  skip = rng.standard_normal((2, 8, 8, 4), np.float32)
  coarse = 3 * rng.standard_normal((2, 4, 4, 8), np.float32)  # large, so that some coefficients saturate
  alpha = gate.coefficients(skip, coarse)
  assert alpha.shape == (2, 8, 8, 1)
  assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0 and float(alpha.std()) > 0.01
  np.testing.assert_allclose(gate(skip, coarse), skip * alpha, rtol=1e-6)
  # The paper's equation on the gating grid, written out: the 2x2 stride-2 W_x is a sum over the four
  # pixels of each 2x2 cell.
  cells = skip.reshape(2, 4, 2, 4, 2, 4)
  w_x = jnp.einsum('bhiwjc,ijcf->bhwf', cells, gate.skip_proj.kernel[...])
  w_g = coarse @ gate.gate_proj.kernel[...] + gate.gate_proj.bias[...]
  q = jax.nn.relu(w_x + w_g) @ gate.psi.kernel[...] + gate.psi.bias[...]
  expected = jax.image.resize(jax.nn.sigmoid(q), (2, 8, 8, 1), 'bilinear')
  np.testing.assert_allclose(alpha, expected, rtol=1e-5, atol=1e-6)


def test_models_command_prints_the_overview_of_a_baseline_config_with_its_argument():
  out = subprocess.run([sys.executable, '-m', 'easunet_jax.models', '--config=configs/unetpp.py:demo'],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  model_cfg = unetpp.get_config('demo').model
  assert model_cfg.features == (16, 32, 64, 128, 256)
  assert 'nested/0/0/up/kernel' in out
  assert out.strip().splitlines()[-1] == f'params: {_config_count(model_cfg)}'


@pytest.mark.parametrize('overrides, message', [
    (['--config.model.eca=False'], "model.eca is an EAS U-Net ablation; model.name 'unet' needs model.eca"),
    (['--config.model.nosuch=1'], '--config.model.nosuch: no such config field (expected one of model.'),
    (['--config.model.features=(8, 16, 32)', '--config.model.features=(4, 8)'],
     '--config.model.features is given 2 times ((8, 16, 32), then (4, 8)), and absl would join them')])
def test_models_command_refuses_a_config_it_cannot_build_in_one_line(overrides, message):
  result = subprocess.run([sys.executable, '-m', 'easunet_jax.models', '--config=configs/unet.py',
                           *overrides], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2 and result.stderr.startswith(f'error: {message}'), result.stderr[-2000:]
  assert len(result.stderr.splitlines()) == 1
