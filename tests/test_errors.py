"""User errors: a library's message on one line, or its type's name where it has none."""

from easunet_jax import errors


def test_one_line_joins_a_messages_lines_and_names_an_empty_one():
  assert errors.one_line(ValueError('header unreadable:\n  sizeof_hdr\tshould be 348 ')) == (
      'header unreadable: sizeof_hdr should be 348')
  assert errors.one_line(KeyError()) == 'KeyError'
