"""Run records: one line per training start in `<workdir>/runs.jsonl` (time, start step, code version,
command, JAX version, device count and the whole config), so that a workdir says how it was made."""

import datetime
import importlib.metadata
import json
import pathlib
import subprocess
import sys

import jax
import ml_collections


def code_version() -> str:
  """`git describe` of the package's checkout, else the installed package's version."""
  here = pathlib.Path(__file__)
  git = ['git', '-C', str(here.parent)]
  try:
    # An installed package inside another repository (a project's .venv, a home kept in git) is a file that
    # repository does not track: its commit is not this code's.
    subprocess.run([*git, 'ls-files', '--error-unmatch', here.name], capture_output=True, check=True,
                   timeout=30)
    return subprocess.run([*git, 'describe', '--always', '--dirty', '--tags'], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    try:
      return importlib.metadata.version('easunet_jax')
    except importlib.metadata.PackageNotFoundError:
      return 'unknown (neither a git checkout nor an installed package)'


def record_start(workdir: pathlib.Path, config: ml_collections.ConfigDict, start_step: int) -> None:
  """Appends this start's record to `<workdir>/runs.jsonl` (process 0 only)."""
  if jax.process_index() > 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'time': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
            'start_step': start_step, 'code_version': code_version(), 'command': sys.argv,
            'jax': jax.__version__, 'devices': jax.device_count(), 'config': config.to_dict()}
  with open(workdir / 'runs.jsonl', 'a') as f:
    f.write(json.dumps(record) + '\n')


def last_config(workdir: pathlib.Path) -> dict | None:
  """The config of the workdir's latest training start, or None where it has no record (a workdir of
  checkpoints copied alone). A line cut short by a crash while it was written is passed over."""
  try:
    lines = (workdir / 'runs.jsonl').read_text().splitlines()
  except FileNotFoundError:
    return None
  for line in reversed(lines):
    try:
      return json.loads(line)['config']
    except (ValueError, KeyError, TypeError):
      continue
  return None
