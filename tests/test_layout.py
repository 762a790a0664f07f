"""The house the imports draw: every import of a project module points to the same layer or one below, and
no import chain comes back to where it started (docs/architecture.md draws the layers)."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS = (
    ('configs', 'easunet_jax.errors', 'easunet_jax.environment', 'easunet_jax.atomic'),
    ('easunet_jax.data', 'easunet_jax.models', 'easunet_jax.metrics', 'easunet_jax.losses',
     'easunet_jax.measures', 'easunet_jax.checkpoints', 'easunet_jax.parallel', 'easunet_jax.progress',
     'easunet_jax.metric_writer', 'easunet_jax.records', 'easunet_jax.figures'),
    ('easunet_jax.steps',),
    ('easunet_jax.train', 'easunet_jax.pretrained', 'easunet_jax.inference', 'easunet_jax.pose'),
    ('easunet_jax.evaluate', 'easunet_jax.predict', 'easunet_jax.reports', 'easunet_jax.config_check'),
    ('main', 'easunet_jax.__main__', 'easunet_jax.sweep', 'easunet_jax.models.__main__', 'bench'),
)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  """Every module of the project except the package's own `__init__`, which holds a docstring only."""
  paths = [REPO / 'main.py', *(REPO / 'easunet_jax').rglob('*.py'), *(REPO / 'configs').glob('*.py'),
           *(REPO / 'bench').glob('*.py')]
  return {_module_name(p): p for p in paths if p != REPO / 'easunet_jax' / '__init__.py'}


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The project modules that `path` imports (`from package import module` counts as the module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
  return {name for name in found if name in modules}


def _layer(module: str) -> int:
  owners = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
            if module == prefix or module.startswith(prefix + '.')]
  assert owners, f'{module} is in no layer: add it to LAYERS and to docs/architecture.md'
  return max(owners)[1]


@pytest.fixture(scope='module')
def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_the_package_init_imports_nothing():
  assert not [n for n in ast.parse((REPO / 'easunet_jax' / '__init__.py').read_text()).body
              if isinstance(n, ast.Import | ast.ImportFrom)]


def test_every_import_points_to_its_own_layer_or_below(graph):
  upward = [f'{a} ({_layer(a)}) -> {b} ({_layer(b)})' for a, imported in graph.items() for b in imported
            if _layer(b) > _layer(a)]
  assert not upward


def test_no_import_cycle(graph):
  done, on_path = set(), []

  def visit(module: str) -> None:
    if module in on_path:
      raise AssertionError('import cycle: ' + ' -> '.join(on_path[on_path.index(module):] + [module]))
    if module in done:
      return
    on_path.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    on_path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)


def test_the_checks_can_fail():
  with pytest.raises(AssertionError, match=r'models\.layers .*-> easunet_jax\.train'):
    test_every_import_points_to_its_own_layer_or_below({'easunet_jax.models.layers': {'easunet_jax.train'}})
  with pytest.raises(AssertionError, match='import cycle: a -> b -> a'):
    test_no_import_cycle({'a': {'b'}, 'b': {'a'}})
