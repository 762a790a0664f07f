"""Training scalars to `<workdir>/metrics.jsonl` (one object per step) and TensorBoard event files."""

import json
import math
import pathlib
from collections.abc import Mapping

import jax
import tensorboardX

from easunet_jax import atomic


def read_rows(path: pathlib.Path) -> list[dict]:
  """The rows of a metrics.jsonl, each with its 'step'; a row that does not parse (written in part by a
  killed run) is left out."""
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
  return rows


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` (one object per step) and TensorBoard event files.

  A run resumed from step `start` first drops the JSONL rows past it, which the killed run logged
  after its last checkpoint and the resumed run logs again, and a last row the kill cut short; TensorBoard
  hides the killed run's events past it (its `purge_step`). Only JAX process 0 writes.
  """

  def __init__(self, workdir: str | pathlib.Path, start: int = 0):
    self._active = jax.process_index() == 0
    if self._active:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      path = workdir / 'metrics.jsonl'
      kept = [row for row in read_rows(path) if row['step'] <= start] if path.exists() else []
      atomic.write_text(path, ''.join(json.dumps(row) + '\n' for row in kept))  # a kill here loses none
      self._jsonl = open(path, 'a')  # noqa: SIM115 - appended to for the whole run, closed by close()
      # tensorboardX names an event file by the second it opens: the start step keeps a run resumed within
      # that second from overwriting the file of the steps before it.
      self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'), purge_step=start + 1,
                                            filename_suffix=f'.from_step_{start:010d}')  # in step order

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    # A NaN or infinite value as null: JSON has no such numbers, and other readers (jq) refuse Python's NaN.
    finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **finite}, allow_nan=False) + '\n')
    self._jsonl.flush()  # a crash must not lose logged steps
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()

