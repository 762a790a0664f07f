"""Progress: the ETA at the mean rate since a (resumed) start, the rate between calls, the status line."""

import pytest

from easunet_jax import progress as progress_module
from easunet_jax.progress import Progress


@pytest.fixture
def clock(monkeypatch):
  """A settable stand-in for time.perf_counter."""
  now = [100.0]
  monkeypatch.setattr(progress_module.time, 'perf_counter', lambda: now[0])
  return now


def test_eta_counts_only_the_work_of_this_start(clock):
  progress = Progress(total=10, done=4, bar=False)  # resumed at 4 of 10
  assert progress.eta_s() != progress.eta_s()  # NaN: no unit done yet
  clock[0] += 30.0
  progress.update(6)  # two units in 30 s: 15 s a unit, four left
  assert progress.eta_s() == pytest.approx(60.0) and progress.rate() == pytest.approx(2 / 30)
  assert progress.status('step') == 'step 6/10 (spent 00:00:30, ETA 00:01:00)'


def test_rate_is_per_interval_and_update_counts_one(clock):
  progress = Progress(total=5, bar=False)
  clock[0] += 4.0
  progress.update()
  progress.update()
  assert progress.done == 2 and progress.rate() == pytest.approx(0.5)
  clock[0] += 1.0
  progress.update()
  assert progress.rate() == pytest.approx(1.0)
  assert progress.status() == '3/5 (spent 00:00:05, ETA 00:00:03)'


def test_time_paused_is_left_out_of_the_rate_not_the_eta(clock):
  """A training's validation and checkpoints between two logged periods: steps/s is of the steps alone."""
  progress = Progress(total=20, bar=False)
  clock[0] += 4.0
  progress.update(4)
  assert progress.rate() == pytest.approx(1.0)
  with progress.paused():
    clock[0] += 6.0
  clock[0] += 2.0
  progress.update(6)
  assert progress.rate() == pytest.approx(1.0)
  assert progress.eta_s() == pytest.approx(12 / 6 * 14)


def test_a_bar_on_a_terminal(clock):
  progress = Progress(total=4, done=1, bar=True)
  assert progress.status('case').startswith('[' + '#' * 7 + '.' * 23 + '] case 1/4 ')
  progress.update(5)  # past the total (a count that overshoots): the bar stays 30 wide
  assert progress.status().startswith('[' + '#' * 30 + '] 5/4 ')
  assert Progress(total=0, bar=True).status() == '[' + '.' * 30 + '] 0/0 (spent 00:00:00, ETA ?)'  # no work


def test_days_of_work_count_their_hours_and_no_eta_goes_below_zero(clock):
  progress = Progress(total=4, bar=False)
  clock[0] += 27 * 3600 + 61.0  # a day and more for one unit: a CPU training of the paper's epochs
  progress.update()
  assert progress.status() == '1/4 (spent 27:01:01, ETA 81:03:03)'
  progress.update(5)  # past the total (a count that overshoots): no ETA of a negative time
  assert progress.status().endswith('ETA 00:00:00)')


def test_due_says_so_once_per_interval(clock):
  progress = Progress(total=100, bar=False)
  clock[0] += 10.0
  assert not progress.due(30.0)
  clock[0] += 25.0
  assert progress.due(30.0) and not progress.due(30.0)  # 35 s after the start, then 0 after saying so
  clock[0] += 29.0
  assert not progress.due(30.0)
  clock[0] += 1.0
  assert progress.due(30.0)
  clock[0] += 40.0
  progress.status()  # a status line shown by other means (a training's log row): the interval starts anew
  clock[0] += 20.0
  assert not progress.due(30.0)
