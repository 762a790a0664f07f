"""Tests of files written whole or not at all: a kill mid-write keeps the earlier file, and what a killed
process of this machine left is removed, while a running process's, another machine's and the user's own
files are kept."""

import errno
import os

import pytest

from easunet_jax import atomic
from easunet_jax.data import volumes


def test_a_kill_mid_write_keeps_the_earlier_file(tmp_path, request):
  path = tmp_path / 'new' / 'report.md'
  atomic.write_text(path, 'earlier report\n')  # makes the folder
  request.getfixturevalue('killed_mid_write')
  with pytest.raises(KeyboardInterrupt):
    atomic.write_text(path, 'later report, longer\n')
  assert path.read_text() == 'earlier report\n' and os.listdir(path.parent) == ['report.md']


def test_the_file_being_written_is_hidden_beside_it_and_ends_in_its_name(tmp_path):
  """Hidden from a user's listing (and the volume files a data set's folder is read for), in the same folder
  (one file system, so the rename is atomic), ending in the file's name (nibabel reads the format from it)."""
  with atomic.replaced(tmp_path / 'knee.nii.gz') as tmp:
    assert tmp.parent == tmp_path and tmp.name.startswith('.easunet-') and tmp.name.endswith('.knee.nii.gz')
    tmp.write_text('mask')
    assert not volumes.volume_files(tmp_path)
  assert os.listdir(tmp_path) == ['knee.nii.gz']


def test_a_link_is_written_through(tmp_path):
  (tmp_path / 'report.md').write_text('earlier')
  (tmp_path / 'latest.md').symlink_to(tmp_path / 'report.md')
  atomic.write_text(tmp_path / 'latest.md', 'later')
  assert (tmp_path / 'latest.md').is_symlink() and (tmp_path / 'report.md').read_text() == 'later'


def test_only_what_a_process_of_this_machine_that_is_gone_left_is_removed(tmp_path, dead_mark):
  gone = dead_mark('')
  left = [tmp_path / f'.{gone}knee.nii.gz', tmp_path / f'slices.{gone}build']
  (tmp_path / f'slices.{gone}build').mkdir()
  kept = [tmp_path / (atomic.mark('.') + 'knee.nii.gz'),  # this process's, being written
          tmp_path / '.easunet-0123abcd-999999999.knee.nii.gz',  # another machine's
          tmp_path / '.tmp999999999.notes.txt', tmp_path / 'knee.nii.gz', tmp_path / f'{gone}notes.txt']
  for path in [left[0], *kept]:
    path.write_text('')
  (tmp_path / 'store').mkdir()  # a marked link to a folder goes, the folder and what it holds stay
  (tmp_path / 'store' / 'slices.npy').write_text('')
  (tmp_path / f'.{gone}store').symlink_to(tmp_path / 'store')
  atomic.remove_left_by_dead(tmp_path)
  atomic.remove_left_by_dead(tmp_path, 'slices.')
  assert sorted(tmp_path.iterdir()) == sorted([*kept, tmp_path / 'store'])
  assert [p.name for p in (tmp_path / 'store').iterdir()] == ['slices.npy']


def test_another_users_process_is_not_gone(monkeypatch):
  """os.kill(pid, 0) on another user's process is refused: it runs, and its files stay."""
  def refused(pid, signal):
    raise PermissionError
  monkeypatch.setattr(atomic.os, 'kill', refused)
  assert not atomic._process_gone(1)


def test_an_error_of_the_hidden_file_names_the_file_asked_for(tmp_path):
  """A folder the user may not write to: the error names their file, not the hidden one beside it."""
  with pytest.raises(PermissionError) as error, atomic.replaced(tmp_path / 'model.npz') as tmp:
    raise PermissionError(errno.EACCES, 'Permission denied', str(tmp))
  assert error.value.filename == str(tmp_path / 'model.npz')


def test_a_name_near_the_file_systems_limit_is_written(tmp_path):
  """The temporary name's mark would push a legal name past 255 bytes: its start is left out there."""
  path = tmp_path / ('k' * 240 + '.nii.gz')
  atomic.write_text(path, 'x')
  assert path.read_text() == 'x' and list(tmp_path.iterdir()) == [path]
