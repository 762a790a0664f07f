"""EAS U-Net: parameter counts of the design (docs/design.md), output shapes, ECA kernel sizes, depthwise
implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, tiny
from easunet_jax import config_check, steps
from easunet_jax.errors import ConfigError
from easunet_jax.models import abstract_model, depthwise_cpu, layers
from easunet_jax.models.eas_unet import DecoderStage, EASUNet
from easunet_jax.models.heads import OutputFusion


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_counts_match_the_design():
  model = abstract_model(default.get_config().model)
  assert _count(model) == 4_166_808
  assert _count(model.stem) == 352
  assert [_count(s) for s in model.encoder] == [2_880, 7_456, 27_200, 103_552, 403_712]
  assert _count(model.eas) == 2_644_485
  # decoder[0] is d1; the design lists d4..d1.
  assert [_count(s) for s in reversed(model.decoder)] == [730_624, 185_088, 47_488, 12_480]
  assert _count(model.output_fusion.heads) == 1_452
  assert _count(model.output_fusion.fusion) == 39


@pytest.mark.parametrize('channels, k', [(512, 5), (256, 5), (128, 5), (64, 3), (32, 3), (16, 3)])
def test_eca_kernel_size(channels, k):
  assert layers.eca_kernel_size(channels) == k


def test_eca_kernel_of_the_model_comes_from_the_widest_stage():
  config = default.get_config().model
  model = abstract_model(config)
  assert model.eas.eca.k == 5 and model.eas.eca.conv.kernel.shape == (5, 1, 1)
  config.features = (16, 32, 64, 128, 2048)  # a widest stage whose kernel no narrower width has
  model = abstract_model(config)
  assert model.eas.eca.k == 7 and model.eas.eca.conv.kernel.shape == (7, 1, 1)


def _forward_shapes(model, x):
  return nnx.eval_shape(lambda m, x: m(x), model, x)


def test_output_shapes_train_and_eval():
  model = abstract_model(default.get_config().model)  # the paper's five levels: stride 16, four sides
  x = jax.ShapeDtypeStruct((2, 32, 48, 1), jnp.float32)
  model.train()
  final, sides = _forward_shapes(model, x)
  assert final.shape == (2, 32, 48, 3) and final.dtype == jnp.float32
  assert len(sides) == 4 and all(s.shape == (2, 32, 48, 3) for s in sides)
  model.eval()
  logits = _forward_shapes(model, x)
  assert logits.shape == (2, 32, 48, 3)
  model.train()
  for shape in ((2, 40, 32, 1), (2, 32, 40, 1)):  # height, then width, off the stride
    with pytest.raises(ValueError, match='multiples of 16'):
      _forward_shapes(model, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_side_outputs_are_resized_with_half_pixel_centres():
  """A side output of half the width, [0, 4], is up-sampled as PyTorch's bilinear interpolate with
  align_corners=False does it: [0, 1, 3, 4] (align_corners=True: [0, 4/3, 8/3, 4]; nearest: [0, 0, 4, 4])."""
  fusion = OutputFusion((1, 1), 1, fusion='add', dtype=jnp.float32, rngs=nnx.Rngs(0))
  for head in fusion.heads:  # the identity
    head.kernel[...], head.bias[...] = jnp.ones((1, 1)), jnp.zeros((1,))
  _, sides = fusion([jnp.zeros((1, 1, 4, 1)), jnp.array([0., 4.]).reshape(1, 1, 2, 1)])
  np.testing.assert_allclose(sides[1][0, 0, :, 0], [0., 1., 3., 4.])


@pytest.mark.parametrize('dilation, size', [(1, 8), (2, 8), (6, 8), (12, 8), (18, 24)])
@pytest.mark.parametrize('impl', ['shift', 'native'])
def test_depthwise_agrees_with_xla_grouped_conv_with_gradients(impl, dilation, size):
  rng = np.random.default_rng(dilation)
  x, kernel, cotangent = (rng.standard_normal(s, np.float32)
                          for s in ((2, size, size + 3, 5), (3, 3, 5), (2, size, size + 3, 5)))

  def vjp(fn):
    out, pullback = jax.vjp(lambda x, k: fn(x, k, dilation), x, kernel)
    return (out,) + pullback(cotangent)

  fn = {'shift': layers.depthwise_shift, 'native': depthwise_cpu.depthwise}[impl]
  for ours, xla in zip(vjp(jax.jit(fn, static_argnums=2)), vjp(layers.depthwise_xla)):
    np.testing.assert_allclose(ours, xla, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('fn', [layers.depthwise_shift, depthwise_cpu.depthwise])
def test_dilation_beyond_the_map_sees_only_the_centre_tap(fn):
  rng = np.random.default_rng(0)
  x, kernel = rng.standard_normal((1, 4, 4, 3), np.float32), rng.standard_normal((3, 3, 3), np.float32)
  np.testing.assert_allclose(fn(x, kernel, 4), x * kernel[1, 1], rtol=1e-6)


@pytest.fixture(scope='module')
def tiny_weights() -> tuple[nnx.State, nnx.State]:
  """Initial (parameters, batch statistics) of tiny's network, by the training code's own compiled
  initialisation (cached with the other tests'): an eager one compiles every parameter shape's draw."""
  config = tiny.get_config()
  state = steps.init_state(config, steps.make_optimizer(config.optim, config.train.num_steps))
  return state.params, state.batch_stats


def _tiny_network(weights, **kwargs) -> EASUNet:
  """Tiny's network (widths 4-16) with `kwargs` and `weights`."""
  model = nnx.eval_shape(lambda: EASUNet(features=tiny.get_config().model.features, **kwargs,
                                         rngs=nnx.Rngs(0)))
  nnx.update(model, *weights)
  return model


def test_whole_network_same_under_shift_and_xla_depthwise(tiny_weights):
  # In float64, so that the comparison sees the maths and not float32 summation order. Forward only: each
  # depthwise implementation's gradient is checked against XLA's above, and autodiff composes the rest.
  outputs = []
  with jax.enable_x64(True):
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 1))  # float64
    # Batch statistics too: flax would write float64 updates into float32 ones.
    weights = jax.tree.map(lambda v: np.asarray(v, np.float64), tiny_weights)
    for impl in ('shift', 'xla'):
      graphdef, state = nnx.split(_tiny_network(weights, depthwise_impl=impl, dtype=jnp.float64))
      outputs.append(jax.jit(lambda state, graphdef=graphdef:  # bound now: the loop rebinds
                             nnx.merge(graphdef, state, copy=True)(x))(state))
  for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.max(np.abs(b)))


def test_auto_depthwise_takes_the_native_kernel_on_cpu_in_float32_only():
  assert jax.default_backend() == 'cpu'
  assert depthwise_cpu.available()  # CI has a C++ compiler: the kernel must build there
  assert layers.resolve_depthwise_impl('auto') == 'native'
  assert layers.resolve_depthwise_impl('auto', jnp.bfloat16) == 'shift'
  with pytest.raises(ConfigError, match='float32'):
    layers.resolve_depthwise_impl('native', jnp.bfloat16)
  with pytest.raises(ConfigError, match='depthwise_impl'):
    layers.resolve_depthwise_impl('grouped')


def test_native_depthwise_runs_the_kernel_in_training_and_xla_stencil_in_evaluation(tiny_weights):
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1), np.float32)
  native = _tiny_network(tiny_weights, depthwise_impl='native')
  shift = _tiny_network(tiny_weights, depthwise_impl='shift')
  for model in (native, shift):
    model.eval()
  assert 'ffi_call' not in str(jax.make_jaxpr(native)(x))
  forward = nnx.jit(lambda model, x: model(x))  # one compile each, not one per operation
  np.testing.assert_allclose(forward(native, x), forward(shift, x), rtol=1e-5, atol=1e-5)
  native.train()
  graphdef, state = nnx.split(native)
  assert 'ffi_call' in str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x)[0])(state, x))


def test_auto_depthwise_builds_the_native_kernel_only_to_train(tiny_weights, monkeypatch):
  """Evaluation (and so predict) never asks for the kernel (a machine without a C++ compiler heard of it
  in every predict), nor does the start-up check of a config; a training where it cannot be built runs
  XLA's stencil."""
  asked = []
  monkeypatch.setattr(depthwise_cpu, 'available', lambda: asked.append(1) or False)
  config_check.trace_model_loss(tiny.get_config(), (32, 32))
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 1), np.float32)
  model = _tiny_network(tiny_weights, depthwise_impl='auto')
  model.eval()
  model(x)
  assert not asked
  model.train()
  graphdef, state = nnx.split(model)
  assert 'ffi_call' not in str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x)[0])(state, x))
  assert asked


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  cfg = tiny.get_config().model
  cfg.dtype = 'bfloat16'
  model = abstract_model(cfg)
  final, sides = _forward_shapes(model, jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32))
  assert final.dtype == jnp.float32 and sides and all(s.dtype == jnp.float32 for s in sides)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_the_eas_module_is_on_the_path_and_the_stem_is_leaky():
  """Other EAS weights give other logits (a module built and counted but skipped would not); the stem's
  activation passes negative values scaled, not cut."""
  model = EASUNet(features=(4, 8, 16), rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 1))
  before = model(x)
  nnx.update(model.eas, jax.tree.map(lambda p: p * 2 + 0.1, nnx.state(model.eas, nnx.Param)))
  assert not np.allclose(model(x), before, atol=1e-4)
  np.testing.assert_allclose(model.stem.act(jnp.array([-1.0, 2.0])), [-layers.LEAKY_SLOPE, 2.0])


def test_add_fusion_is_the_sum_of_the_side_logits():
  """Fusion 'add' (an ablation): the final logits are the four side outputs' sum, each side at full size."""
  fusion = OutputFusion((4, 8, 16, 32), 3, fusion='add', dtype=jnp.float32, rngs=nnx.Rngs(0))
  maps = [jax.random.normal(jax.random.key(i), (2, 32 // 2 ** i, 32 // 2 ** i, c))
          for i, c in enumerate((4, 8, 16, 32))]
  final, sides = fusion(maps)
  assert [s.shape for s in sides] == [(2, 32, 32, 3)] * 4
  for head, side, x in zip(fusion.heads, sides, maps):  # each head's logits up-sampled bilinearly
    np.testing.assert_allclose(side, jax.image.resize(head(x), (2, 32, 32, 3), 'bilinear'), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(final, sum(sides), rtol=1e-6)
  assert not np.allclose(final, sides[0], atol=0.1)


# Each EAS U-Net ablation: (field, value, parameter change against the paper's network at the default widths).
# eca: the 5 ECA weights; eas: the whole module; deep_supervision: the four side heads and the fusion
# (1,452 + 39) for one 1x1 head on d1 (32 * 3 + 3); fusion 'add': the 4K -> K fusion convolution.
ABLATIONS = [('block', 'standard', None), ('eca', False, -5), ('eas', False, -2_644_485),
             ('deep_supervision', False, -1_452 - 39 + 99), ('fusion', 'add', -39)]


@pytest.mark.parametrize('field, value, change', ABLATIONS)
def test_ablation_switch_changes_the_network_and_keeps_the_output_shapes(field, value, change):
  model_cfg = default.get_config().model
  model_cfg[field] = value
  delta = _count(abstract_model(model_cfg)) - 4_166_808
  if change is None:  # full 3x3 convolutions in place of depthwise-separable blocks: more weights
    assert delta > 0
  else:
    assert delta == change

  tiny_cfg = tiny.get_config().model
  tiny_cfg[field] = value
  model = abstract_model(tiny_cfg)
  x = jax.ShapeDtypeStruct((2, 32, 32, 1), jnp.float32)
  final, sides = _forward_shapes(model, x)
  assert final.shape == (2, 32, 32, 3)
  num_sides = 0 if field == 'deep_supervision' else len(tiny_cfg.features) - 1
  assert [s.shape for s in sides] == [final.shape] * num_sides
  model.eval()
  assert _forward_shapes(model, x).shape == (2, 32, 32, 3)


@pytest.mark.parametrize('overrides, message', [
    ({'block': 'dense'}, 'model.block'), ({'eca': 1}, 'model.eca'), ({'fusion': 'mean'}, 'model.fusion'),
    ({'fusion': 'add', 'deep_supervision': False}, 'needs model.deep_supervision'),
    ({'name': 'unet', 'eas': False}, 'EAS U-Net ablation')])
def test_bad_ablation_values_are_refused(overrides, message):
  model_cfg = tiny.get_config().model
  with model_cfg.ignore_type():
    model_cfg.update(overrides)
  with pytest.raises(ConfigError, match=message):
    abstract_model(model_cfg)


def test_eas_unet_decoder_stage_puts_the_up_sampled_map_before_the_skip():
  stage = DecoderStage(4, 2, block=lambda c_in, c_out, **_: (lambda x: x), dtype=jnp.float32,
                       rngs=nnx.Rngs(0))
  seen = []
  stage.block1 = seen.append
  stage.block2 = lambda x: x
  x = jax.random.normal(jax.random.key(0), (1, 2, 2, 4))
  skip = jax.random.normal(jax.random.key(1), (1, 4, 4, 2))
  stage(x, skip)
  np.testing.assert_allclose(seen[0], jnp.concatenate([stage.up(x), skip], axis=-1))
