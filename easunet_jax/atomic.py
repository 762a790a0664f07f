"""Files written so that a crash or a stop leaves the earlier file or none, never half of one, and the
temporary files that killed runs left behind."""

import contextlib
import os
import pathlib
from collections.abc import Iterator


@contextlib.contextmanager
def replaced(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """A hidden temporary path beside `path` to write to, renamed to `path` when the block ends without an
  error (and removed when it raises). Its name keeps `path`'s ending, from which nibabel reads the format,
  and this process's id (`remove_left_by_dead`). Makes the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.tmp{os.getpid()}.{path.name}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str, **kwargs) -> None:
  """`pathlib.Path.write_text` (its `kwargs`) through `replaced`."""
  with replaced(path) as tmp:
    tmp.write_text(text, **kwargs)


def process_gone(pid: int) -> bool:
  """Whether no process `pid` runs on this machine (a process of another user's runs)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def remove_left_by_dead(folder: str | pathlib.Path) -> None:
  """Removes the temporary files of `replaced` in `folder` whose process is gone: a kill mid-write."""
  for tmp in pathlib.Path(folder).glob('.tmp*.*'):
    pid = tmp.name[len('.tmp'):].partition('.')[0]
    if pid.isdigit() and process_gone(int(pid)):
      tmp.unlink(missing_ok=True)
