"""What predict writes of its scans beside their masks: the measures per plate and compartment as CSV,
a Markdown report with each scan's thickness map and slice figure, and, of scans scored against expert
labels, their scores (CSV, a Markdown section, a Bland-Altman plot of mean thickness) and one printed line
each."""

import csv
import pathlib
from collections.abc import Sequence

import numpy as np

from easunet_jax import atomic, figures, measures, metrics
from easunet_jax.data import volumes

SIDES = {'R': 'right', 'L': 'left'}
AS_THE_HEADER = 'as the header'  # a result's orientation where the check kept the header's


def number(value: float, spec: str, unit: str = '') -> str:
  """`value` formatted by `spec`, then `unit`; n/a where undefined (NaN: a plate empty in the labels or the
  mask)."""
  return 'n/a' if np.isnan(value) else format(value, spec) + unit


def print_scores(source: pathlib.Path, result: dict) -> None:
  """The scan's scores in one line; n/a where undefined."""
  def text(plate: str, name: str, spec: str) -> str:
    return number(result['scores'][plate][name], spec)

  print(f"{source.name}: against {result['labels']}: Dice FC {text('fc', 'dice', '.1f')} % TC "
        f"{text('tc', 'dice', '.1f')} %, HD95 FC {text('fc', 'hd95', '.2f')} TC {text('tc', 'hd95', '.2f')} "
        f"mm, mean thickness error FC {text('fc', 'thickness_error_mm', '+.2f')} TC "
        f"{text('tc', 'thickness_error_mm', '+.2f')} mm", flush=True)


def score_lines(scored: Sequence[dict]) -> list[str]:
  """The Markdown section of the scans scored against expert labels: per scan and the mean ± std."""
  def cells(fc: dict, tc: dict) -> list[float]:
    return [fc['dice'], tc['dice'], (fc['dice'] + tc['dice']) / 2, fc['hd95'], tc['hd95'],
            fc['thickness_error_mm'], tc['thickness_error_mm']]

  lines = ['## Against the expert labels', '',
           '3D, per scan: Dice (%), HD95 (mm) and the error of mean thickness (mm, prediction - labels) of '
           'each plate; precision, recall, HD, ASSD, volumes and the mean 2D Dice of the sagittal slices '
           "with cartilage (the paper's protocol) in the scores CSV.", '',
           '| Scan | FC Dice % | TC Dice % | Mean Dice % | FC HD95 mm | TC HD95 mm | FC thickness error mm | '
           'TC thickness error mm |', '|---|---|---|---|---|---|---|---|']
  rows = [cells(r['scores']['fc'], r['scores']['tc']) for r in scored]
  lines += [f"| {pathlib.Path(r['input']).name} | " + ' | '.join(number(x, '.2f') for x in row)
            + ' |'
            for r, row in zip(scored, rows)]
  lines += [f'| mean ± std ({len(scored)} scans) | ' + ' | '.join(map(mean_std, zip(*rows))) + ' |', '']
  return lines


def case_ids(inputs: Sequence[str | pathlib.Path]) -> list[str]:
  """The case ids of scans given together, as evaluate's per_case.csv names cases: a scan file's name less
  its volume suffix (a DICOM folder's name), and less nnU-Net's channel suffix _0000 where every scan's ends
  in it (imagesTs/ of a data set)."""
  stems = [volumes.volume_stem(name) or name for name in (pathlib.Path(i).name for i in inputs)]
  if all(stem.endswith('_0000') for stem in stems):
    return [stem.removesuffix('_0000') for stem in stems]
  return stems


def _cells(row: dict, columns: Sequence[str]) -> list[float | int]:
  """A CSV row's figures in full precision, a flag (both masks empty) as 0 or 1."""
  return [int(row[c]) if isinstance(row[c], bool) else row[c] for c in columns]


def write_scores(scored: Sequence[dict], path: pathlib.Path) -> None:
  """One CSV row per scan scored against labels and plate: its case id and `evaluate.label_scores`."""
  columns = list(scored[0]['scores']['fc'])
  with atomic.replaced(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8',
                                         errors='surrogateescape') as f:
    writer = csv.writer(f)
    writer.writerow(['case', 'scan', 'mask', 'labels', 'plate', *columns])
    writer.writerows([r['case'], r['input'], r['output'], r['labels'], plate, *_cells(row, columns)]
                     for r in scored for plate, row in r['scores'].items())


def write_reports(results: Sequence[dict], paths: dict[str, pathlib.Path], model: str) -> None:
  """One CSV row per scan and region (plate or compartment) of `measures.region_measures`, the scan's case id
  (`case_ids`) first, and a Markdown summary of the same with each scan's thickness map, saying which
  `model` made the masks; of scans scored against labels, their scores (`write_scores`), a section of the
  summary and a Bland-Altman plot of each plate's mean thickness."""
  csv_path, markdown_path = paths['measures'], paths['report']
  columns = list(results[0]['regions']['fc'])
  # File names in another encoding than UTF-8 (held as surrogates) are written back as their bytes.
  with atomic.replaced(csv_path) as tmp, open(tmp, 'w', newline='', encoding='utf-8',
                                             errors='surrogateescape') as f:
    writer = csv.writer(f)
    writer.writerow(['case', 'scan', 'mask', 'laterality', 'region', *columns])
    writer.writerows([r['case'], r['input'], r['output'], SIDES.get(r['laterality'], 'unknown'), region,
                      *_cells(row, columns)]
                     for r in results for region, row in r['regions'].items())
  lines = ['# Cartilage measures', '',
           "Per plate and compartment: volume, 3D local thickness over the plate's medial surface "
           'ridge (mean, median, 95th percentile, max), mid-surface area (volume / mean thickness) and the '
           f'fraction of the ridge thinner than {measures.THIN_MM:g} mm. Thickness maps: femur from below, '
           'tibia from above.',
           '', f'Masks made by {model}.', '']
  if scored := [r for r in results if 'scores' in r]:
    write_scores(scored, paths['scores'])
    lines += score_lines(scored)
    names, truth, found = zip(*[(plate.upper(), scores['thickness_true_mm'], scores['thickness_pred_mm'])
                                for r in scored for plate, scores in r['scores'].items()])
    figures.plot_bland_altman(truth, found, names, 'mm', paths['bland_altman'])
    lines += [_image_link('Bland-Altman plot of mean thickness, FC and TC of every scan',
                          paths['bland_altman'].relative_to(markdown_path.parent)), '']
  else:  # an earlier run's scores would sit beside masks they were not taken of
    for stale in (paths['scores'], paths['bland_altman']):
      stale.unlink(missing_ok=True)
  for r in results:
    turned = '' if r['orientation'] == AS_THE_HEADER else f"; turned against its header ({r['orientation']})"
    if r['rotation_deg']:
      turned += f"; segmented with its sagittal slices rotated by {r['rotation_deg']:+g} degrees"
    lines += [f"## {r['input']}", '', f"Mask `{r['output']}`; {r['laterality_text']}{turned}.", '',
              '| Region | Volume mm³ | Mean mm | Median mm | P95 mm | Max mm | Area mm² | < 1 mm |',
              '|---|---|---|---|---|---|---|---|']
    for region, row in r['regions'].items():
      cells = [f'{row["volume_mm3"]:.0f}', *(number(row[f'thickness_{name}_mm'], '.2f')
                                             for name in ('mean', 'median', 'p95', 'max')),
               number(row['area_mm2'], '.0f'), number(100 * row['thin_fraction'], '.1f', ' %')]
      lines.append(f'| {region} | ' + ' | '.join(cells) + ' |')
    png, slices = pathlib.Path(r['thickness_png']), pathlib.Path(r['slices_png'])
    lines += ['', _image_link(f'thickness map of {png.name}', png.relative_to(markdown_path.parent)), '',
              _image_link(f'sagittal slices of {slices.name}', slices.relative_to(markdown_path.parent)), '']
  atomic.write_text(markdown_path, '\n'.join(lines), encoding='utf-8', errors='surrogateescape')


def _image_link(text: str, path: pathlib.Path) -> str:
  """A Markdown image of `path`, its destination in angle brackets: CommonMark ends a bare one at a space
  (a scan named 'knee 1.nii.gz') and at an unbalanced parenthesis."""
  return f'![{text}](<{path}>)'


def mean_std(values: Sequence[float]) -> str:
  """'mean ± std' of the scans' defined values, saying how many those are where some are undefined."""
  summary = metrics.summarize(values)
  text = metrics.mean_std_text(summary['mean'], summary['std'])
  return f"{text} ({summary['n']} of {len(values)} scans)" if 0 < summary['n'] < len(values) else text
