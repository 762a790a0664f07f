"""The errors a user can fix: a bad flag or config field, a bad data file, a missing or foreign checkpoint.

Each is raised where the problem is found, with a one-line message that names the field or file and what
was expected. `main.py` prints that line alone and exits with `exit_code`; any other exception is a bug
and shows its traceback.
"""

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
  """Something the user gave cannot be used; the message says what and what was expected, in one line."""
  exit_code = 1


class ConfigError(UserError):
  """A flag or config field with a value the run cannot use, found before anything is compiled."""
  exit_code = 2


class DataError(UserError):
  """A missing, unreadable or inconsistent data file (volumes, labels, split files, inputs to predict)."""


class CheckpointError(UserError):
  """No checkpoint where one is needed, a corrupt one, one trained with another model, or one whose weights
  diverged."""


def one_line(error: BaseException) -> str:
  """`error`'s message on one line (its whitespace runs made single spaces), or its type's name where it
  has none."""
  return ' '.join(str(error).split()) or type(error).__name__


def positive_int(text: str) -> int:
  """An argparse type of the bench scripts' counts (knees, slices, repeats): a whole number >= 1, or
  argparse's one-line usage error."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number >= 1')
  return value


def run_cli(main: Callable[[], None]) -> None:
  """Runs a command line program's `main` (the bench scripts'), a UserError ending it in one line
  (`exit_with`)."""
  try:
    main()
  except UserError as e:
    exit_with(e)


def exit_with(error: UserError) -> NoReturn:
  """Ends a command line program (main.py, the sweep) on a user error: 'error: <its message>' in one line on
  stderr, and its exit code."""
  print(f'error: {one_line(error)}', file=sys.stderr)
  sys.exit(error.exit_code)
