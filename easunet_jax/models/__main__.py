"""`python -m easunet_jax.models --config=configs/eas.py`: the parameter overview of a config's network."""

from absl import app, logging
from clu import parameter_overview
from flax import nnx
from ml_collections import config_flags

from easunet_jax import environment
from easunet_jax.errors import ConfigError, UserError, exit_with

environment.check_own_configs()

from easunet_jax import config_check  # noqa: E402
from easunet_jax.models import abstract_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Configuration file.', lock_config=True)


def main(argv):
  del argv  # config_check.parse_flags refused any argument that is not a flag
  logging.set_verbosity(logging.WARNING)  # JAX's INFO lines (its TPU probe) say nothing of the network
  if _CONFIG.value is None:
    exit_with(ConfigError('--config is needed, e.g. --config=configs/eas.py'))
  try:
    # Shapes alone, no initialisation: instant for any width, and the overview needs no values.
    model = abstract_model(_CONFIG.value.model)
  except UserError as e:
    exit_with(e)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  print(parameter_overview.get_parameter_overview(params, include_stats=False))
  print(f'params: {parameter_overview.count_parameters(params)}')


if __name__ == '__main__':
  app.run(main, flags_parser=config_check.parse_flags)
