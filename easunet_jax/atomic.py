"""Files written so that a crash or a stop leaves the earlier file or none, never half of one, and what
killed runs left behind.

Temporary files and folders carry a mark: 'easunet', the machine (8 hex digits of its name's hash, one
length whatever the name) and the process id (`mark`). Only marked paths of this machine whose process is
gone are removed (`remove_left_by_dead`): never a user's file, nor the write in progress of a run on
another machine sharing the folder.
"""

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import socket
from collections.abc import Iterator

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
NAME_MAX = 255  # bytes of a file's name that Linux's and macOS's file systems allow


def mark(prefix: str) -> str:
  """`prefix` + this process's mark: a temporary path's name starts so (`remove_left_by_dead`)."""
  return f'{prefix}easunet-{_HOST}-{os.getpid()}.'


@contextlib.contextmanager
def replaced(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """A hidden temporary path beside `path` (a link: beside the file it points to) to write to, renamed to
  `path` when the block ends without an error and removed when it raises. Its name ends in `path`'s, from
  which nibabel reads the format (its start is left out where the mark would make it longer than a file
  system allows). Makes the folder."""
  path = pathlib.Path(path)
  path = path.resolve() if path.is_symlink() else path
  path.parent.mkdir(parents=True, exist_ok=True)
  name = path.name
  while len(os.fsencode(mark('.') + name)) > NAME_MAX:
    name = name[1:]
  tmp = path.with_name(mark('.') + name)
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    if e.filename is not None and os.fspath(e.filename) == os.fspath(tmp):  # the one the user asked for
      e.filename = os.fspath(path)
    raise
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str, **kwargs) -> None:
  """`pathlib.Path.write_text` (its `kwargs`) through `replaced`."""
  with replaced(path) as tmp:
    tmp.write_text(text, **kwargs)


def _process_gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # another user's
    return False
  return False


def remove_left_by_dead(folder: str | pathlib.Path, prefix: str = '.') -> None:
  """Removes what processes of this machine that are gone (killed) left in `folder` named `mark(prefix)` +
  anything: `replaced`'s temporary files by default."""
  folder = pathlib.Path(folder)
  pattern = re.compile(rf'{re.escape(prefix)}easunet-{re.escape(_HOST)}-([0-9]{{1,9}})\.')
  left = [path for path in (folder.iterdir() if folder.is_dir() else [])
          if (found := pattern.match(path.name)) and _process_gone(int(found[1]))]
  for path in left:
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
    else:
      path.unlink(missing_ok=True)
