"""Run records: each start appends its line to runs.jsonl; the code version is git's (marked when the
checkout has changes), or the package's outside a checkout."""

import importlib.metadata
import json
import subprocess
import sys

import jax
import pytest

from configs import tiny
from easunet_jax import records


def test_each_start_appends_its_record(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['main.py', '--mode=train'])
  config = tiny.get_config()
  for start in (0, 3):
    records.record_start(tmp_path, config, start)
  starts = [json.loads(line) for line in (tmp_path / 'runs.jsonl').read_text().splitlines()]
  assert [s['start_step'] for s in starts] == [0, 3]
  assert starts[0]['config'] == json.loads(json.dumps(config.to_dict())) and starts[0]['devices'] == 4
  assert starts[0]['command'] == ['main.py', '--mode=train'] and starts[0]['jax'] == jax.__version__
  assert starts[0]['code_version'] == records.code_version() and starts[0]['time'].endswith('+00:00')


def test_the_code_version_of_a_changed_checkout_says_so(tmp_path, monkeypatch):
  """A run of uncommitted code is not recorded as its commit's."""
  git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(tmp_path)]
  (tmp_path / 'records.py').write_text('a')
  for args in (['init', '-q'], ['add', '.'], ['commit', '-qm', 'first']):
    subprocess.run(git + args, check=True)
  monkeypatch.setattr(records, '__file__', str(tmp_path / 'records.py'))
  clean = records.code_version()
  (tmp_path / 'records.py').write_text('b')
  assert records.code_version() == clean + '-dirty'


@pytest.mark.parametrize('installed, in_a_repository', [(True, False), (False, False), (True, True)])
def test_the_code_version_outside_a_git_checkout_is_the_packages(tmp_path, monkeypatch, installed,
                                                                 in_a_repository):
  """Also where the installed package lies in another repository (a venv inside a project's checkout),
  which does not track it: that repository's commit is not the code's."""
  monkeypatch.setattr(records, '__file__', str(tmp_path / 'site-packages' / 'records.py'))
  (tmp_path / 'site-packages').mkdir()
  (tmp_path / 'site-packages' / 'records.py').write_text('a')
  if in_a_repository:
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(tmp_path)]
    (tmp_path / 'README').write_text('a project')
    for args in (['init', '-q'], ['add', 'README'], ['commit', '-qm', 'first']):
      subprocess.run(git + args, check=True)
  assert (subprocess.run(['git', 'describe', '--always'], cwd=tmp_path, capture_output=True).returncode
          == (0 if in_a_repository else 128))

  def version(name):
    if not installed:
      raise importlib.metadata.PackageNotFoundError(name)
    return {'easunet_jax': '1.2.3'}[name]

  monkeypatch.setattr(importlib.metadata, 'version', version)
  assert records.code_version() == (
      '1.2.3' if installed else 'unknown (neither a git checkout nor an installed package)')
