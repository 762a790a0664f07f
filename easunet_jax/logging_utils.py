"""Metric writers (JSONL always, TensorBoard via tensorboardX) and the training progress line."""

import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping

import jax
import tensorboardX


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` (one object per step) and TensorBoard event files.

  A run resumed from step `start` first drops the JSONL rows past it, which the killed run logged
  after its last checkpoint and the resumed run logs again. Only JAX process 0 writes.
  """

  def __init__(self, workdir: str | pathlib.Path, start: int = 0):
    self._active = jax.process_index() == 0
    if self._active:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      path = workdir / 'metrics.jsonl'
      rows = path.read_text().splitlines() if path.exists() else []
      kept = [row for row in rows if json.loads(row)['step'] <= start]
      path.write_text(''.join(row + '\n' for row in kept))
      self._jsonl = open(path, 'a')  # noqa: SIM115 - appended to for the whole run, closed by close()
      self._tb = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()  # a crash must not lose logged steps
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Steps/s and ETA over a run of `total` steps that started (or resumed) at `start`."""

  def __init__(self, start: int, total: int):
    self.start, self.total = start, total
    self._t0 = time.perf_counter()
    self._last_step, self._last_time = start, self._t0
    self._tty = sys.stderr.isatty()

  def rate(self, step: int) -> float:
    """Steps/s since the previous call (the first interval includes compilation)."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def eta_seconds(self, step: int) -> float:
    done = step - self.start
    elapsed = time.perf_counter() - self._t0
    return elapsed / done * (self.total - step) if done else float('nan')

  def line(self, step: int, loss: float, steps_per_s: float) -> str:
    eta = self.eta_seconds(step)
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if math.isfinite(eta) else '?'
    width = 30
    bar = '#' * int(width * step / self.total) + '.' * (width - int(width * step / self.total))
    prefix = f'[{bar}] ' if self._tty else ''
    return (f'{prefix}step {step}/{self.total}  loss {loss:.4f}  {steps_per_s:.2f} steps/s  '
            f'ETA {eta_text}')
