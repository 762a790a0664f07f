"""Tests of the training log on resume: JSONL rows past the checkpoint and a row cut short by a kill are
dropped, and TensorBoard is told to hide the killed run's events past it."""

import json
import struct
import time

import pytest
from tensorboardX.proto import event_pb2

from easunet_jax.metric_writer import MetricWriter


def _events(path) -> list[event_pb2.Event]:
  """The events of one TFRecord event file (length, its CRC, the record, its CRC)."""
  data, offset, events = path.read_bytes(), 0, []
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_a_resumed_log_drops_later_rows_and_a_cut_row_and_purges_later_events(tmp_path, monkeypatch):
  writer = MetricWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'train/loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"train/loss": 2.5}\n[4]\n')  # lines of no step (another tool's, say) are no rows
    f.write('{"step": 4, "train/lo')  # the kill came mid-write
  (first,) = (tmp_path / 'tensorboard').iterdir()
  # tensorboardX names an event file by the second it opens: the resumed run opens its file in the same one.
  monkeypatch.setattr(time, 'time', lambda: float(first.name.split('.')[3]))
  writer = MetricWriter(tmp_path, start=2)  # resumed from the checkpoint of step 2
  writer.write_scalars(3, {'train/loss': 30.0})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(row['step'], row['train/loss']) for row in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  (resumed,) = set((tmp_path / 'tensorboard').iterdir()) - {first}
  # TensorBoard shows each scalar under its JSONL key, at its step.
  assert [(e.step, v.tag, v.simple_value) for e in _events(first) for v in e.summary.value] == [
      (1, 'train/loss', 1.0), (2, 'train/loss', 2.0), (3, 'train/loss', 3.0)]
  # TensorBoard hides the events of step 3 on that earlier files hold: the session restarts at step 3.
  starts = [e.step for e in _events(resumed) if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [3]


def test_a_kill_while_a_resumed_run_rewrites_the_log_loses_no_row(tmp_path, request):
  writer = MetricWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'train/loss': float(step)})
  writer.close()
  before = (tmp_path / 'metrics.jsonl').read_text()
  request.getfixturevalue('killed_mid_write')
  with pytest.raises(KeyboardInterrupt):
    MetricWriter(tmp_path, start=3)
  assert (tmp_path / 'metrics.jsonl').read_text() == before


def test_a_value_that_is_not_finite_is_written_as_json_null(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write_scalars(1, {'val/loss': float('nan'), 'train/loss': float('inf'), 'train/lr': 0.01})
  writer.close()
  line = (tmp_path / 'metrics.jsonl').read_text()
  # Strict JSON (jq, JavaScript): NaN and Infinity are no JSON numbers.
  assert json.loads(line, parse_constant=pytest.fail) == {
      'step': 1, 'val/loss': None, 'train/loss': None, 'train/lr': 0.01}
