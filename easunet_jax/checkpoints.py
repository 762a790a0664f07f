"""Orbax checkpoint wiring: `<workdir>/checkpoints/<step>/` with the train state, the data iterator's
position and the config; keeps the latest `keep` steps and the best by validation mean cartilage Dice."""

import pathlib
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = 'val/dice_mean'


def _score(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def manager(workdir: str | pathlib.Path, keep: int) -> ocp.CheckpointManager:
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
  ])
  # The preservation policy decides what is kept; best_fn makes orbax write each step's metrics to
  # disk (without it they live only in memory, and a resumed run would forget which step was best).
  options = ocp.CheckpointManagerOptions(preservation_policy=preservation, best_fn=_score,
                                         best_mode='max', create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints', options=options,
                               item_names=('state', 'data_iter', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter_state: dict,
         config: ml_collections.ConfigDict, metrics: dict[str, float] | None = None) -> None:
  args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data_iter=ocp.args.JsonSave(data_iter_state),
                            config=ocp.args.JsonSave(config.to_dict()))
  mngr.save(step, args=args, metrics=metrics, force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """(state, data iterator state) of `step`, the state laid out like `abstract_state`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore()))
  return restored.state, restored.data_iter
