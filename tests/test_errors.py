"""User errors: a library's message on one line, or its type's name where it has none."""

import pytest

from easunet_jax import errors


def test_one_line_joins_a_messages_lines_and_names_an_empty_one():
  assert errors.one_line(ValueError('header unreadable:\n  sizeof_hdr\tshould be 348 ')) == (
      'header unreadable: sizeof_hdr should be 348')
  assert errors.one_line(KeyError()) == 'KeyError'


def test_a_programs_user_error_ends_it_in_one_line_with_its_exit_code(capsys):
  def main():
    raise errors.ConfigError('--num: expected a count of at least 1,\n  got 0')

  with pytest.raises(SystemExit) as exit_:
    errors.run_cli(main)
  assert exit_.value.code == errors.ConfigError.exit_code
  assert capsys.readouterr().err == 'error: --num: expected a count of at least 1, got 0\n'
