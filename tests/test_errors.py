"""User errors: a library's message on one line, or its type's name where it has none."""

import argparse

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


def test_a_bench_scripts_count_below_one_is_argparses_one_line_usage_error(capsys):
  parser = argparse.ArgumentParser(prog='transfer.py')
  parser.add_argument('--num', type=errors.positive_int, default=3)
  assert parser.parse_args(['--num=2']).num == 2
  for bad in ('0', '-1', 'three', '2.5'):
    with pytest.raises(SystemExit) as exit_:
      parser.parse_args([f'--num={bad}'])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"transfer.py: error: argument --num: '{bad}' is not a whole number >= 1")
