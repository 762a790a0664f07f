"""The jitted core: the train state (fresh, or restored for inference), the optimiser, the loss of a model
on a batch, and the train, eval and forward steps over a ('data',) mesh. Training, evaluation, prediction
and the benchmarks all build on it.
"""

import functools
import pathlib
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from flax import nnx

from easunet_jax import checkpoints, losses, metrics, parallel
from easunet_jax.data import augment, synth
from easunet_jax.errors import ConfigError
from easunet_jax.models import abstract_model, build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


@flax.struct.dataclass
class FirstNonFinite(clu_metrics.Metric):
  """The first step whose loss or gradients were not finite; 0 when there was none."""
  step: jax.Array

  @classmethod
  def from_model_output(cls, *, step: jax.Array, nonfinite: jax.Array, **_) -> 'FirstNonFinite':
    return cls(step=jnp.where(nonfinite, step, 0))

  def merge(self, other: 'FirstNonFinite') -> 'FirstNonFinite':  # self holds the earlier steps
    return type(self)(step=jnp.where(self.step > 0, self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class SkippedSteps(clu_metrics.Metric):
  """How many steps left the state unchanged because their loss or gradients were not finite."""
  count: jax.Array

  @classmethod
  def from_model_output(cls, *, nonfinite: jax.Array, **_) -> 'SkippedSteps':
    return cls(count=nonfinite.astype(jnp.int32))

  def merge(self, other: 'SkippedSteps') -> 'SkippedSteps':
    return type(self)(count=self.count + other.count)

  def compute(self) -> jax.Array:
    return self.count


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Accumulated on the devices between logging steps; the losses average the finite steps only."""
  loss: clu_metrics.Average.from_output('loss')
  loss_final: clu_metrics.Average.from_output('loss_final')
  skipped_steps: SkippedSteps
  first_nonfinite_step: FirstNonFinite


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(optim_cfg.lr)
  if optim_cfg.schedule == 'poly':  # nnU-Net's: lr * (1 - step / num_steps) ** 0.9, every step
    return optax.polynomial_schedule(optim_cfg.lr, 0.0, power=0.9, transition_steps=num_steps)
  raise ConfigError(f"optim.schedule: expected 'constant' or 'poly', got {optim_cfg.schedule!r}")


def make_optimizer(optim_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """PyTorch SGD(lr, momentum, weight_decay): the decay joins the gradient before momentum."""
  return optax.chain(
      optax.add_decayed_weights(optim_cfg.weight_decay),
      optax.sgd(learning_rate_schedule(optim_cfg, num_steps), momentum=optim_cfg.momentum))


def graphdefs(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """(training, evaluation) graphdefs of the config's model, from shapes alone."""
  model = abstract_model(config.model)
  train_graphdef = nnx.graphdef(model)
  model.eval()
  return train_graphdef, nnx.graphdef(model)


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """A freshly initialised state, laid out by `sharding`.

  The initialisation runs as one jitted program: eagerly, every parameter shape compiles its own
  initialiser, which takes several times longer on CPU. Its random numbers come from the threefry that
  is not partitionable: the program runs once and shards nothing, and its ~100 draws compile in about
  half the time (docs/performance.md).
  """
  def init(key: jax.Array) -> TrainState:
    _, params, batch_stats = nnx.split(build_model(config.model, nnx.Rngs(key)), nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))

  with jax.threefry_partitionable(False):
    # The key is an argument, not a constant: the runs of a sweep over seeds share one compiled program.
    return jax.jit(init, out_shardings=sharding)(jax.random.key(config.seed))


def abstract_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   sharding: jax.sharding.Sharding) -> TrainState:
  """`init_state`'s shapes and dtypes, laid out by `sharding`, without compiling its initialisers (10-15 s
  on CPU): what a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(lambda: init_state(config, tx)))


def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       sharding: jax.sharding.Sharding | None = None
                       ) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
  """(training graphdef, evaluation graphdef, state) of a freshly initialised model."""
  return *graphdefs(config), init_state(config, tx, sharding)


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                          mesh: jax.sharding.Mesh, same_split: bool = False
                          ) -> tuple[int, nnx.GraphDef, TrainState]:
  """(step, evaluation graphdef, state replicated over `mesh`) of the checkpoint eval.checkpoint names
  (`checkpoints.restore_for_inference`: its checks run before any state is built). The optimiser only
  gives the state a trained one's structure: num_steps shapes the learning-rate schedule, which inference
  never calls."""
  tx = make_optimizer(config.optim, num_steps=1)
  step, state = checkpoints.restore_for_inference(
      config, workdir, lambda: abstract_state(config, tx, parallel.shardings(mesh)[1]), same_split)
  return step, graphdefs(config)[1], state


def model_loss(model: nnx.Module, batch: dict[str, jax.Array], loss_cfg: ml_collections.ConfigDict
               ) -> tuple[jax.Array, jax.Array]:
  """(total, final output's) loss of a training-mode model on a batch."""
  final, sides = model(batch['image'])
  return losses.deep_supervision_loss(final, sides, batch['label'], tuple(loss_cfg.side_weights),
                                      loss_cfg.dice_eps)


def training_batch(batch: dict[str, jax.Array], key: jax.Array, *, augment_ranges: augment.Ranges | None,
                   synthesise: bool) -> dict[str, jax.Array]:
  """The batch a train step learns from: the store's compact dtypes widened; augmented within
  `augment_ranges` unless None (`augment_ranges(config.data)`); with `synthesise` its images drawn from its
  tissue maps (`data.synth`, after the spatial augmentation, which moves tissue and labels alike; the
  store holds no training images then)."""
  if synthesise:
    batch = {'label': batch['label'].astype(jnp.int32), 'tissue': batch['tissue'].astype(jnp.int32)}
    key, synth_key = jax.random.split(key)  # two streams: augmentation splits its key per slice
  else:
    batch = {'image': batch['image'].astype(jnp.float32), 'label': batch['label'].astype(jnp.int32)}
  if augment_ranges is not None:
    batch = augment.augment(key, batch, augment_ranges)
  if synthesise:
    batch['image'] = synth.render_batch(synth_key, batch.pop('tissue'))
  return batch


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict, seed: int,
               augment_ranges: augment.Ranges | None, synthesise: bool) -> tuple[TrainState, TrainMetrics]:
  """One optimiser step on `training_batch`, whose random numbers come from a key folded from the seed and
  the step count, so that a resumed run draws what an uninterrupted one drew."""
  batch = training_batch(batch, augment.step_key(seed, state.step), augment_ranges=augment_ranges,
                         synthesise=synthesise)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    total, loss_final = model_loss(model, batch, loss_cfg)
    return total, (loss_final, nnx.state(model, nnx.BatchStat))

  (loss, (loss_final, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # One scalar for all gradients: a per-leaf isfinite().all() is fused by XLA into every parameter update
  # and made the train step's compile several times slower on CPU. A norm that overflows float32 counts
  # as non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  updated = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                          opt_state=opt_state)
  # A step with a non-finite loss or gradient changes nothing but the step count and the learning-rate
  # schedule's (which follows the steps, as PyTorch's scheduler.step() each iteration or nnU-Net's poly of
  # the epoch): train.nan_policy 'skip' goes on from the last finite state, and 'stop' never has a
  # non-finite state to save.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  schedule_count = optax.tree_utils.tree_get(updated.opt_state, 'count')
  new_state = new_state.replace(step=state.step + 1, opt_state=optax.tree_utils.tree_set(
      new_state.opt_state, count=schedule_count))
  # Per-step outputs of shape (1,), so that clu applies the mask to them.
  return new_state, TrainMetrics.single_from_model_output(
      loss=loss[None], loss_final=loss_final[None], mask=finite[None], step=new_state.step,
      nonfinite=~finite)


def forward(state: TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef) -> jax.Array:
  """Logits (B, H, W, K) of the evaluation-mode model."""
  return nnx.merge(graphdef, state.params, state.batch_stats)(image_BHW1)


# The start of the errors of a network whose outputs are not finite: diverged weights give NaN logits,
# whose argmax is background, so that masks would be empty as of scans without cartilage.
NOT_FINITE = 'the network outputs NaN or infinite values'


def forward_checked(state: TrainState, image_BHW1: jax.Array, *, graphdef: nnx.GraphDef
                    ) -> tuple[jax.Array, jax.Array]:
  """`forward`'s logits, and whether all of them are finite (`NOT_FINITE`)."""
  logits = forward(state, image_BHW1, graphdef=graphdef)
  return logits, jnp.isfinite(logits).all()


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              num_classes: int) -> dict[str, jax.Array | dict[str, jax.Array]]:
  """Per-sample confusion counts (B, K-1, 3) = (TP, FP, FN) of each foreground class, and the loss's sums
  (`losses.loss_sums`: summed over batches, the validation set's loss however it is batched and sharded).
  Both leave out the store's padding (batch['valid'] False), as evaluation crops it off."""
  logits = forward(state, batch['image'], graphdef=graphdef)
  label = batch['label']
  counts = metrics.confusion_counts(jnp.where(batch['valid'], jnp.argmax(logits, axis=-1), 0), label,
                                    num_classes)
  valid = batch['valid'] & batch['mask'][:, None, None]
  return {'counts': counts, 'loss_sums': losses.loss_sums(logits, label, valid),
          'num_valid': jnp.sum(batch['mask'])}


def augment_ranges(data_cfg: ml_collections.ConfigDict) -> augment.Ranges | None:
  """The training augmentation's ranges by `data.augment` and `data.augment_rotate_deg`; None: off."""
  return augment.Ranges(rotate_deg=data_cfg.augment_rotate_deg) if data_cfg.augment else None


def jit_steps(config: ml_collections.ConfigDict, train_graphdef: nnx.GraphDef, eval_graphdef: nnx.GraphDef,
              tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """The train step (state donated; augmenting its batch when data.augment, synthesising its images when
  data.synth) and eval step, compiled for
  batches sharded over `mesh`."""
  data_sharding, replicated = parallel.shardings(mesh)
  p_train_step = jax.jit(
      functools.partial(train_step, graphdef=train_graphdef, tx=tx, loss_cfg=config.loss,
                        seed=config.seed, augment_ranges=augment_ranges(config.data),
                        synthesise=config.data.synth),
      in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  p_eval_step = jax.jit(
      functools.partial(eval_step, graphdef=eval_graphdef, num_classes=config.model.num_classes),
      in_shardings=(replicated, data_sharding), out_shardings=replicated)
  return p_train_step, p_eval_step
