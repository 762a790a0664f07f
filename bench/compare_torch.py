"""Ours against the PyTorch reference of the same network (`--torch_bench`, by default
`../shared/bench/torch_bench.py` beside this checkout), run alternately in one process tree.

  python bench/compare_torch.py --config=configs/eas.py --batch=4 --size=384 --pairs=3

Each pair runs, one subprocess after another and in the same environment (`environment.benchmark_env`: the
settings main.py runs with, --threads threads for PyTorch), `bench/step_time.py` for the training step and
for inference, and the reference in each of --torch_layouts, and compares ours with the faster layout.
Figures on a shared machine move between runs; ratios of neighbouring runs move much less, so the median
over pairs of the per-pair ratios is what the last line, one JSON object, reports.

PyTorch is no dependency of the project: the reference runs under $TORCH_PYTHON, else
`.bench/torch-venv/bin/python`, which is made (`pip install torch==2.13.0 numpy`) when missing.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

from absl import app, flags

from easunet_jax import environment

REPO = pathlib.Path(__file__).resolve().parent.parent
TORCH_VENV = REPO / '.bench' / 'torch-venv'

_CONFIG = flags.DEFINE_string('config', str(REPO / 'configs' / 'eas.py'),
                              "Our configuration (the reference is EAS U-Net at configs/eas.py's widths).")
_BATCH = flags.DEFINE_integer('batch', 4, 'Slices per step, both sides.', lower_bound=1)
_SIZE = flags.DEFINE_integer('size', 384, 'Slice height and width, both sides.', lower_bound=1)
_PAIRS = flags.DEFINE_integer('pairs', 3, 'Alternating rounds of ours and the reference.', lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps of each run (its median is used).', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first.', lower_bound=0)
_THREADS = flags.DEFINE_integer('threads', 2, "PyTorch's threads (XLA:CPU uses one per core).",
                               lower_bound=1)
_TORCH_LAYOUTS = flags.DEFINE_list('torch_layouts', ['channels_last', 'nchw'],
                                   'Memory layouts the reference runs in; the faster counts.')
_TORCH_BENCH = flags.DEFINE_string('torch_bench', str(REPO.parent / 'shared' / 'bench' / 'torch_bench.py'),
                                   "The reference's benchmark script.")
_CACHE_DIR = flags.DEFINE_string('cache_dir', str(REPO / '.bench' / 'jax-cache'),
                                 "JAX's persistent compilation cache for our runs: only the first compiles.")


def torch_python() -> str:
  """$TORCH_PYTHON, else the repo's git-ignored torch venv, made on first use (takes a minute or two)."""
  if os.environ.get('TORCH_PYTHON'):
    return os.environ['TORCH_PYTHON']
  python = TORCH_VENV / 'bin' / 'python'
  if not python.exists():
    print(f'making {TORCH_VENV} (torch==2.13.0, numpy)', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', str(TORCH_VENV)], check=True)
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', 'torch==2.13.0', 'numpy'], check=True)
  return str(python)


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
  """Runs `cmd` and returns the JSON object on the last line of its stdout."""
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if not os.path.isfile(_TORCH_BENCH.value):
    raise app.UsageError(f"--torch_bench={_TORCH_BENCH.value}: no such file (the PyTorch reference's "
                         'benchmark script)')
  config = os.path.abspath(_CONFIG.value)  # step_time.py runs in the repo root, not here
  env = environment.benchmark_env(_THREADS.value)
  common = [f'--batch={_BATCH.value}', f'--size={_SIZE.value}', f'--steps={_STEPS.value}',
            f'--warmup={_WARMUP.value}']
  ours = [sys.executable, '-u']
  python = torch_python()
  # Before our side is timed: a Python without torch would fail only after it.
  if subprocess.run([python, '-c', 'import torch'], env=env, capture_output=True, check=False).returncode:
    raise app.UsageError(f'{python} cannot import torch; set $TORCH_PYTHON to a Python that can')
  torch_cmd = [python, _TORCH_BENCH.value, '--model', 'eas_unet', '--batch', str(_BATCH.value),
               '--size', str(_SIZE.value), '--steps', str(_STEPS.value), '--warmup', str(_WARMUP.value),
               '--threads', str(_THREADS.value)]
  pairs = []
  for pair in range(_PAIRS.value):
    train = run_json(ours + ['bench/step_time.py', '--step=train', f'--config={config}',
                             f'--cache_dir={_CACHE_DIR.value}'] + common, env)
    infer = run_json(ours + ['bench/step_time.py', '--step=inference', f'--config={config}'] + common,
                     env)
    torch_runs = {layout: run_json(torch_cmd + ['--channels-last'] * (layout == 'channels_last'), env)
                  for layout in _TORCH_LAYOUTS.value}
    torch_train = max(torch_runs.values(), key=lambda r: r['train_slices_per_s'])
    torch_infer = max(torch_runs.values(), key=lambda r: r['infer_slices_per_s'])
    row = {
        'ours_train_slices_per_s': train['train_slices_per_s'], 'ours_infer_slices_per_s':
        infer['infer_slices_per_s'], 'ours_compile_s': train['compile_s'],
        'torch_train_slices_per_s': torch_train['train_slices_per_s'],
        'torch_train_layout': 'channels_last' if torch_train['channels_last'] else 'nchw',
        'torch_infer_slices_per_s': torch_infer['infer_slices_per_s'],
        'torch_infer_layout': 'channels_last' if torch_infer['channels_last'] else 'nchw',
        'torch_all': {k: [r['train_slices_per_s'], r['infer_slices_per_s']] for k, r in torch_runs.items()}}
    row['train_ratio'] = round(row['ours_train_slices_per_s'] / row['torch_train_slices_per_s'], 3)
    row['infer_ratio'] = round(row['ours_infer_slices_per_s'] / row['torch_infer_slices_per_s'], 3)
    pairs.append(row)
    print(f"pair {pair + 1}: train {row['ours_train_slices_per_s']} vs {row['torch_train_slices_per_s']} "
          f"({row['torch_train_layout']}) slices/s = {row['train_ratio']}; inference "
          f"{row['ours_infer_slices_per_s']} vs {row['torch_infer_slices_per_s']} "
          f"({row['torch_infer_layout']}) = {row['infer_ratio']}; our compile {row['ours_compile_s']} s",
          flush=True)
  print(json.dumps({
      'config': config, 'batch': _BATCH.value, 'size': _SIZE.value, 'threads': _THREADS.value,
      'device': train['device'], 'dtype': train['dtype'], 'torch': torch_train['torch'],
      'train_ratio_median': statistics.median(r['train_ratio'] for r in pairs),
      'infer_ratio_median': statistics.median(r['infer_ratio'] for r in pairs), 'pairs': pairs}))


if __name__ == '__main__':
  app.run(main)
