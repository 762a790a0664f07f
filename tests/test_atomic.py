"""Tests of files written whole or not at all: a kill mid-write keeps the earlier file, and what a killed
process left half-written is removed, while a running process's is kept."""

import os

import pytest

from easunet_jax import atomic


def test_a_kill_mid_write_keeps_the_earlier_file(tmp_path, request):
  path = tmp_path / 'new' / 'report.md'
  atomic.write_text(path, 'earlier report\n')  # makes the folder
  request.getfixturevalue('killed_mid_write')
  with pytest.raises(KeyboardInterrupt):
    atomic.write_text(path, 'later report, longer\n')
  assert path.read_text() == 'earlier report\n' and os.listdir(path.parent) == ['report.md']


def test_only_the_files_of_a_process_that_is_gone_are_removed(tmp_path):
  dead = tmp_path / '.tmp999999999.knee.nii.gz'  # no process has such an id
  running = tmp_path / f'.tmp{os.getpid()}.knee.nii.gz'
  mine = [tmp_path / '.tmpnotes.txt', tmp_path / 'knee.nii.gz']
  for path in (dead, running, *mine):
    path.write_text('')
  atomic.remove_left_by_dead(tmp_path)
  assert sorted(tmp_path.iterdir()) == sorted([running, *mine])
