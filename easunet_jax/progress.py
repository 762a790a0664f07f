"""Progress of long work (training steps, cases preprocessed, evaluated or predicted): done / total, time
spent, and the ETA at the mean rate so far; a bar on a terminal."""

import contextlib
import math
import sys
import time
from collections.abc import Iterator

# Long work between its own status lines (a scan segmented for minutes on a CPU, a training's steps between
# log rows, a validation) says how far it is this often.
EVERY_S = 30.0


def _clock(seconds: float) -> str:
  """HH:MM:SS, the hours past 24 too (a CPU training of the paper's 50 epochs takes days)."""
  if not math.isfinite(seconds):
    return '?'
  minutes, secs = divmod(max(int(seconds), 0), 60)
  return f'{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}'


class Progress:
  """`total` units of work, of which `done` were done before this start (a resumed run). `bar`: draw a
  progress bar in the status line (default: when stderr, where the logs go, is a terminal)."""

  def __init__(self, total: int, done: int = 0, bar: bool | None = None):
    self.total, self.done = total, done
    self._first, self._start = done, time.perf_counter()
    self._last_done, self._last_time = done, self._start
    self._shown = self._start
    self._bar = sys.stderr.isatty() if bar is None else bar

  def update(self, done: int | None = None) -> None:
    """Records that `done` units are done (default: one more)."""
    self.done = self.done + 1 if done is None else done

  @property
  def spent_s(self) -> float:
    return time.perf_counter() - self._start

  def eta_s(self) -> float:
    """Seconds left at the mean rate since the start; NaN before the first unit."""
    done = self.done - self._first
    return self.spent_s / done * max(self.total - self.done, 0) if done else float('nan')

  def rate(self) -> float:
    """Units per second since the previous call (the first interval includes compilation)."""
    now = time.perf_counter()
    rate = (self.done - self._last_done) / max(now - self._last_time, 1e-9)
    self._last_done, self._last_time = self.done, now
    return rate

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Leaves the time spent in the block (a training's validation and checkpoints) out of the next `rate`,
    which then measures the work alone; the ETA keeps it, as the work to come holds more of it."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._last_time += time.perf_counter() - start

  def due(self, seconds: float) -> bool:
    """Whether `seconds` have passed since this last said so or gave a `status` (or since the start): a
    status line that long work shows every so often, not at every unit."""
    now = time.perf_counter()
    if now - self._shown < seconds:
      return False
    self._shown = now
    return True

  def status(self, unit: str = '') -> str:
    """'[####......] ' on a terminal, then '<unit> done/total (spent HH:MM:SS, ETA HH:MM:SS)'."""
    self._shown = time.perf_counter()
    parts = [unit, f'{self.done}/{self.total}',
             f'(spent {_clock(self.spent_s)}, ETA {_clock(self.eta_s())})']
    if self._bar:
      filled = min(int(30 * self.done / max(self.total, 1)), 30)
      parts.insert(0, f"[{'#' * filled}{'.' * (30 - filled)}]")
    return ' '.join(part for part in parts if part)
