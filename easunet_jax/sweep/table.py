"""The sweep's table: per protocol, cartilage and variant, the mean and sample std over seeds of each
point's test-set mean (from its `eval/<step>/metrics.json`), as table.md, table.csv and dice.png."""

import csv
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from easunet_jax import atomic, figures, metrics
from easunet_jax.data.volumes import CLASSES
from easunet_jax.sweep.points import Point, Variant

# The columns of the paper's Table 1 plus HD95, and their headers; evaluate.py's metrics.json holds them.
COLUMNS = {'dice': 'DSC %', 'precision': 'Precision %', 'recall': 'Recall %', 'hd': 'HD mm',
           'hd95': 'HD95 mm'}
PROTOCOLS = {'2d': "2D, per slice with cartilage (the paper's Table 1 protocol)", '3d': '3D, per volume'}


def table_rows(variants: Sequence[Variant], points: Sequence[Point],
               evaluations: dict[Point, pathlib.Path | None]) -> list[dict]:
  """Rows of the table: per protocol, cartilage and variant, the mean and sample std over seeds of each
  run's test-set mean of every column, and the number of seeds that finished."""
  results = {p: json.loads(path.read_text()) for p, path in evaluations.items() if path is not None}
  rows = []
  for protocol in PROTOCOLS:
    for cartilage in CLASSES:
      for variant in variants:
        runs = [results[p] for p in points if p.variant == variant and p in results]
        row = {'protocol': protocol, 'cartilage': cartilage, 'variant': variant.name, 'model': variant.title,
               'seeds': len(runs)}
        for column in COLUMNS:
          # metrics.json writes an undefined mean (a distance where every case had exactly one mask empty)
          # as null.
          values = [run[protocol][cartilage][column]['mean'] for run in runs]
          stats = metrics.summarize([np.nan if v is None else v for v in values])
          row[f'{column}_mean'], row[f'{column}_std'] = stats['mean'], stats['std']
          row[f'{column}_seeds'] = stats['n']  # fewer than 'seeds' where a run's mean is undefined
        rows.append(row)
  return rows


def _cell(row: dict, column: str) -> str:
  """'mean ± std' of a column, with the count of seeds it averages where that is not every seed's."""
  text = metrics.mean_std_text(row[f'{column}_mean'], row[f'{column}_std'])
  seeds = row[f'{column}_seeds']
  return f"{text} ({seeds} of {row['seeds']} seeds)" if 0 < seeds < row['seeds'] else text


def write_table(rows: Sequence[dict], failures: dict[Point, str], sweep: str, workdir: pathlib.Path) -> None:
  """table.md (Table-1-shaped, one section per protocol), table.csv (the same rows) and dice.png."""
  lines = [f'# Sweep `{sweep}`', '',
           ("Mean ± sample std over seeds of each run's test-set mean (`<point>/eval/<step>/metrics.json`); "
            "*Seeds* counts the runs that finished. A run's HD and HD95 count a case with both masks empty "
            'as 0 mm and leave out a case with exactly one empty (no distance); a run with no case left '
            'leaves the mean of its seeds to the others (their count in brackets).'), '']
  for protocol, title in PROTOCOLS.items():
    lines += [f'## {title}', '', '| Cartilage | Model | Seeds | ' + ' | '.join(COLUMNS.values()) + ' |',
              '|---|---|---|' + '---|' * len(COLUMNS)]
    lines += [f"| {r['cartilage'].upper()} | {r['model']} | {r['seeds']} | " +
              ' | '.join(_cell(r, c) for c in COLUMNS) + ' |' for r in rows if r['protocol'] == protocol]
    lines.append('')
  if failures:
    lines += ['## Failed points', ''] + [f'- `{p.name}`: {error}' for p, error in failures.items()] + ['']
  atomic.remove_left_by_dead(workdir)  # a killed sweep's half-written tables
  atomic.write_text(workdir / 'table.md', '\n'.join(lines))
  with atomic.replaced(workdir / 'table.csv') as tmp, open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  figures.dice_bars([r for r in rows if r['protocol'] == '2d'], workdir / 'dice.png')
