"""Evaluation: the files of a tiny run's evaluation, their agreement, thickness and volume errors, the
largest-component filter, and one-line errors for a missing, absent, corrupt or foreign checkpoint."""

import csv
import dataclasses
import functools
import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest
from scipy import ndimage

from configs import tiny
from easunet_jax import atomic, checkpoints, evaluate, figures, metrics, parallel, steps
from easunet_jax.data import knee, pipeline, preprocess
from easunet_jax.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(scope='module')
def run(trained_tiny):
  """(workdir, eval dir) of the session's trained tiny run, evaluated."""
  config, workdir = trained_tiny
  return workdir, evaluate.evaluate(config.copy_and_resolve_references(), workdir)


@pytest.fixture
def config(trained_tiny):
  """The trained tiny run's config, for a test to change."""
  return trained_tiny[0].copy_and_resolve_references()


def test_files_written(run):
  workdir, out = run
  metrics = json.loads((out / 'metrics.json').read_text())
  assert out == workdir / 'eval' / str(metrics['step'])
  for name in ('metrics.json', 'per_case.csv', 'report.md'):
    assert (out / name).stat().st_size > 0
  for name in ('loss_curves.png', 'overlays.png', 'bland_altman_thickness.png'):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert metrics['requested'] == 'best' and metrics['largest_component'] is False
  assert metrics['synthetic_images'] == 0  # the phantom's test cases have images
  rows = pipeline.read_index(workdir / 'slices' / 'test')
  assert metrics['num_volumes'] == len({row['case'] for row in rows}) == 2
  assert metrics['num_cartilage_slices'] == sum(row['cartilage'] for row in rows)
  # The phantom's voxel size (tiny config), recorded per row in the slice store.
  assert all(s == [3.5, 2.0, 2.0] for s in metrics['spacing_mm'].values())
  for protocol in ('3d', '2d'):
    for cls in ('fc', 'tc'):
      assert set(metrics[protocol][cls]['dice']) == {'mean', 'std', 'n', 'n_empty'}


def test_3d_mean_dice_is_the_mean_of_per_case_csv(run):
  _, out = run
  metrics = json.loads((out / 'metrics.json').read_text())
  with open(out / 'per_case.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2
  assert list(rows[0]) == ['case'] + [f'{c}_{m}' for c in ('fc', 'tc') for m in evaluate.METRICS]
  for cls in ('fc', 'tc'):
    per_case_mean = np.mean([float(r[f'{cls}_dice']) for r in rows])
    assert metrics['3d'][cls]['dice']['mean'] == pytest.approx(per_case_mean, abs=1e-9)


def test_report_is_a_markdown_table_beside_the_paper(run):
  _, out = run
  text = (out / 'report.md').read_text()
  metrics = json.loads((out / 'metrics.json').read_text())  # the step evaluated, 'best' named it
  assert text.startswith(f"# Test-set evaluation of `{metrics['name']}`, step {metrics['step']}\n")
  assert "(eval.checkpoint = 'best')" in text
  tables = [block.splitlines() for block in text.split('\n\n') if block.startswith('|')]
  assert len(tables) == 3  # 3D, 2D, then thickness and volume errors
  for table in tables[:2]:
    assert table[0].split('|')[1:-1] == [' Cartilage ', ' Model ', ' DSC % ', ' Precision % ', ' Recall % ',
                                          ' HD mm ', ' HD95 mm ', ' ASSD mm ']
    assert set(table[1].replace('|', '')) == {'-'}
    assert all(line.startswith('|') and line.endswith('|') and line.count('|') == 9 for line in table)
    assert [line.split('|')[1].strip() for line in table[2:]] == ['FC', 'FC', 'TC', 'TC']
    assert '| FC | EAS U-Net (paper) | 90.37 | 91.69 | 90.27 | 6.34 |' in '\n'.join(table)
  assert '(largest connected component per class): **off**' in text


def test_morphometry_csv_and_report_hold_the_thickness_and_volume_errors(run):
  _, out = run
  metrics = json.loads((out / 'metrics.json').read_text())
  with open(out / 'morphometry.csv') as f:
    rows = list(csv.DictReader(f))
  plates, compartments = ['fc', 'tc'], ['fc_left', 'fc_right', 'fc_trochlea', 'tc_left', 'tc_right']
  # A case whose labels hold one tibial plate (its slices one side of the knee's gap) has no compartments.
  regions = {case: [r['region'] for r in rows if r['case'] == case] for case in {r['case'] for r in rows}}
  assert sorted(map(sorted, regions.values()), key=len) == [plates, sorted(plates + compartments)]
  assert list(metrics['morphometry']) == plates + compartments
  for r in rows:
    signed = float(r['thickness_pred_mm']) - float(r['thickness_true_mm'])
    assert float(r['thickness_error_mm']) == pytest.approx(signed, abs=1e-6, nan_ok=True)
    assert float(r['thickness_abs_error_mm']) == pytest.approx(abs(signed), abs=1e-6, nan_ok=True)
    if float(r['volume_pred_mm3']) == 0:  # a region the model missed has no thickness, and no error of it
      assert np.isnan(float(r['thickness_pred_mm'])) and np.isnan(float(r['thickness_error_mm']))
  fc_errors = [float(r['thickness_error_mm']) for r in rows if r['region'] == 'fc']
  measured = [e for e in fc_errors if not np.isnan(e)]
  assert metrics['morphometry']['fc']['thickness_error_mm']['mean'] == (
      pytest.approx(np.mean(measured)) if measured else None)
  report = (out / 'report.md').read_text()
  assert '## Thickness and volume against the ground truth' in report and '| fc_trochlea |' in report


def test_morphometry_errors_of_the_reference_knee():
  labels, spacing = knee.reference()
  classes = np.select([labels == 2, labels == 4], [1, 2], 0).astype(np.uint8)
  # The tibial plates and the femoral cartilage up to 8 mm above them (two thirds of it, every region still
  # there), cropped with a 3-voxel margin: half the time of the whole femoral plate's thickness maps.
  top = ndimage.find_objects(classes)[1][2].stop + int(8 / spacing[2])
  box = ndimage.find_objects((classes[:, :, :top] > 0).astype(np.uint8))[0]
  classes = np.pad(classes[box], 3)
  exact = evaluate.morphometry_errors(classes, classes, spacing)
  assert all(e['thickness_error_mm'] == 0 and e['volume_error_pct'] == 0 for e in exact.values())
  thinner = classes.copy()
  thinner[(classes == 2) & (np.roll(classes, -1, axis=2) != 2)] = 0  # the top layer of the tibial plates
  errors = evaluate.morphometry_errors(thinner, classes, spacing)
  assert errors['tc']['volume_error_pct'] < -10 and errors['tc']['thickness_error_mm'] < -0.2
  assert errors['fc']['volume_error_pct'] == 0
  assert errors['tc_left']['volume_pred_mm3'] + errors['tc_right']['volume_pred_mm3'] == pytest.approx(
      errors['tc']['volume_pred_mm3'])
  # A truth without tibial cartilage: no thickness to compare with, not a truth of thickness 0.
  errors = evaluate.morphometry_errors(classes, np.where(classes == 2, 0, classes), spacing)
  assert all(np.isnan(errors[r][m]) for r in ('tc', 'tc_left', 'tc_right')
             for m in ('thickness_true_mm', 'thickness_error_mm', 'volume_error_pct'))
  assert errors['fc']['thickness_error_mm'] == 0


def test_keep_largest_component_is_per_class_and_face_connected():
  pred = np.zeros((3, 5, 5), np.uint8)
  pred[0, 0, 0:3] = 1  # FC: 3 voxels
  pred[2, 4, 4] = 1  # FC: 1 voxel apart
  pred[1, 1, 1] = 2  # TC: only diagonal neighbours, so three components of one voxel ...
  pred[0, 2, 2] = pred[2, 0, 0] = 2
  pred[1, 3:5, 3] = 2  # ... and one of two
  kept = evaluate.keep_largest_component(pred, num_classes=3)
  expected = np.zeros_like(pred)
  expected[0, 0, 0:3] = 1
  expected[1, 3:5, 3] = 2
  np.testing.assert_array_equal(kept, expected)


def test_slice_scores_are_in_the_in_plane_pixels_mm():
  """Voxels of 4 mm (left-right) x 1 mm x 0.5 mm: a femoral plate shifted 2 pixels along H and a tibial one
  2 pixels along W score HD95 2 mm and 1 mm on their slice, not in the slice thickness's 4 mm."""
  label = np.zeros((3, 20, 20), np.uint8)
  label[0, 3:8, 3:9] = 1
  label[0, 12:17, 10:16] = 2
  pred = np.zeros_like(label)
  pred[0, 5:10, 3:9] = 1
  pred[0, 12:17, 12:18] = 2
  _, per_slice = evaluate.volume_metrics(pred, label, [True, False, False], (4.0, 1.0, 0.5))
  assert [len(per_slice[name]) for name in ('fc', 'tc')] == [1, 1]
  assert per_slice['fc'][0]['hd95'] == pytest.approx(2.0)
  assert per_slice['tc'][0]['hd95'] == pytest.approx(1.0)


def test_both_empty_is_only_where_neither_mask_has_a_voxel():
  empty, blob = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
  blob[1:3, 1:3] = True
  scores = [evaluate._scores(a, b, (1.0, 1.0)) for a, b in
            ((empty, empty), (empty, blob), (blob, empty), (blob, blob))]
  assert [s['both_empty'] for s in scores] == [True, False, False, False]
  assert evaluate._summary(scores)['n_both_empty'] == 1


def test_the_report_counts_the_cases_with_one_mask_empty(tmp_path):
  """A case whose prediction alone is empty scores Dice 0, which counts, and no distances, which leave it
  out: the report counts it as one with one mask empty, apart from one with both empty."""
  empty, blob = np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool)
  blob[0, 1:3, 1:3] = True
  cases = [evaluate._scores(a, b, (1.0, 1.0, 1.0)) for a, b in ((empty, blob), (blob, blob), (empty, empty))]
  summary = {'name': 'tiny', 'step': 6, 'checkpoint_dir': 'checkpoints/6', 'requested': 'best',
             'largest_component': False, 'num_volumes': 3, 'num_cartilage_slices': 2, 'synthetic_images': 0,
             'spacing_mm': {'a': [1.0, 1.0, 1.0]}, 'morphometry': {},
             **{protocol: dict.fromkeys(('fc', 'tc'), evaluate._summary(cases)) for protocol in ('3d', '2d')}}
  evaluate.write_report(tmp_path / 'report.md', metrics.nan_as_null(summary))
  assert 'Counts: FC 3 volumes, 1 with one mask empty, 1 with both empty; TC 3 volumes' in (
      tmp_path / 'report.md').read_text()


def test_2d_dice_averages_the_slices_whose_labels_hold_cartilage():
  """The paper's protocol: a speck predicted on a slice without cartilage in the labels leaves the 2D
  Dice at 100 (the 3D Dice pays for it)."""
  truth = np.zeros((3, 8, 8), np.uint8)
  truth[0, 2:6, 2:6] = 1
  pred = truth.copy()
  pred[1, 0, 0] = 1
  scores = evaluate.label_scores(pred, truth, (1.0, 1.0, 1.0))['fc']
  assert scores['dice_2d'] == 100 and scores['dice'] < 100


def test_a_slice_is_cropped_of_the_padding_the_store_gave_it():
  """Padding uneven on both sides of both axes (5 rows centred in 8, 7 columns in 12)."""
  original = np.arange(35).reshape(5, 7)
  pad = [preprocess.centred_padding(5, 8), preprocess.centred_padding(7, 12)]
  assert pad == [(1, 2), (2, 3)]
  np.testing.assert_array_equal(evaluate._crop(np.pad(original, pad), pad), original)


def test_a_network_whose_outputs_are_not_finite_is_refused(trained_tiny):
  """Diverged weights give NaN logits, whose argmax is background: scored, a model that found nothing."""
  config, workdir = trained_tiny
  mesh = parallel.make_mesh()
  _, graphdef, state = steps.restore_for_inference(config, workdir, mesh)
  diverged = dataclasses.replace(state, params=jax.tree.map(lambda w: w * np.inf, state.params))
  test = pipeline.read_split(workdir / 'slices', 'test')
  with pytest.raises(CheckpointError, match=r'^the network outputs NaN or infinite values on the slices of '
                     rf"case {test.index[0]['case']}: its weights diverged in training; evaluate an earlier "
                     r'checkpoint \(eval.checkpoint=<step>\)$'):
    evaluate.score_test_set(config, graphdef, diverged, test, mesh)


def test_a_class_no_test_case_holds_is_warned_of(trained_tiny, caplog):
  """A label map that reads no tibial cartilage (a wrong data.label_map) scores TC 100 wherever the model
  marks none: a warning says the scores tell nothing."""
  config, workdir = trained_tiny
  mesh = parallel.make_mesh()
  _, graphdef, state = steps.restore_for_inference(config, workdir, mesh)
  test = pipeline.read_split(workdir / 'slices', 'test')
  caplog.set_level(logging.WARNING)
  evaluate.score_test_set(config, graphdef, state, test, mesh)
  assert 'labels hold' not in caplog.text
  without_tc = test._replace(labels=np.where(test.labels == 2, 0, test.labels))
  evaluate.score_test_set(config, graphdef, state, without_tc, mesh)
  assert ("no test case's labels hold TC: its Dice is 1 (100 %) wherever the model marks none of it, and "
          'tells nothing; check data.label_map') in caplog.text and 'hold FC' not in caplog.text


def _one_line_error(error_type, config, workdir, match):
  with pytest.raises(error_type, match=match) as info:
    evaluate.evaluate(config, workdir)
  assert '\n' not in str(info.value)
  return str(info.value)


def test_no_checkpoint_is_one_line(tmp_path):
  _one_line_error(CheckpointError, tiny.get_config(), tmp_path / 'never_trained', 'no checkpoint in')


def test_missing_step_and_bad_choice_are_one_line(run, config):
  workdir, _ = run
  config.eval.checkpoint = '999'
  message = _one_line_error(CheckpointError, config, workdir, 'step 999 is not in')
  assert 'steps: 3, 6' in message
  config.eval.checkpoint = 'newest'
  _one_line_error(ConfigError, config, workdir, "expected 'best', 'latest' or a step number")


def test_workdir_of_another_model_is_refused_naming_both(run, config):
  workdir, _ = run
  config.model.features = (8, 16, 32)
  message = _one_line_error(CheckpointError, config, workdir, 'was trained with model')
  assert 'features=(4, 8, 16)' in message and 'features=(8, 16, 32)' in message


def test_corrupt_checkpoint_is_one_line(run, config, tmp_path):
  workdir, _ = run
  copy = tmp_path / 'tiny'
  shutil.copytree(workdir / 'checkpoints', copy / 'checkpoints')
  for chunk in (copy / 'checkpoints' / '6' / 'state').rglob('d/*'):
    chunk.write_bytes(chunk.read_bytes()[:10])
  config.eval.checkpoint = 'latest'
  _one_line_error(CheckpointError, config, copy, 'checkpoints/6: unreadable or corrupt checkpoint')


def test_largest_component_run_is_kept_apart_says_so_and_a_stopped_rerun_keeps_the_earlier(
    run, config, tmp_path, caplog, monkeypatch):
  workdir, _ = run
  copy = tmp_path / 'tiny'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  config.data.phantom_dir = str(workdir.parent / 'phantom')  # the same sources: the copied store is reused
  config.eval.checkpoint = '3'
  with open(copy / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 7, "train/lo')  # a killed run's last row, cut short: the loss curves leave it out
  plotted, plot = [], figures.plot_bland_altman
  monkeypatch.setattr(figures, 'plot_bland_altman', lambda *args: (plotted.append(args), plot(*args)))
  plain = evaluate.evaluate(config, copy)
  # The Bland-Altman plot of every compartment row of morphometry.csv, the truth first.
  with open(plain / 'morphometry.csv') as f:
    rows = [r for r in csv.DictReader(f) if r['region'] not in ('fc', 'tc')]
  truth, found, groups = plotted[0][:3]
  np.testing.assert_allclose(truth, [float(r['thickness_true_mm']) for r in rows])
  np.testing.assert_allclose(found, [float(r['thickness_pred_mm']) for r in rows])
  assert list(groups) == [r['region'] for r in rows] and len(rows) == 5  # the compartments of one case
  config.eval.largest_component = True
  out = evaluate.evaluate(config, copy)
  assert (plain, out) == (copy / 'eval' / '3', copy / 'eval' / '3-largest_component')
  assert json.loads((plain / 'metrics.json').read_text())['largest_component'] is False
  assert json.loads((out / 'metrics.json').read_text())['largest_component'] is True
  assert '(largest connected component per class): **on**' in (out / 'report.md').read_text()
  with caplog.at_level(logging.WARNING):
    assert evaluate.evaluate(config, copy) == out
  assert f'{out} held an earlier evaluation of step 3: replaced' in caplog.text
  assert sorted(p.name for p in (copy / 'eval').iterdir()) == ['3', '3-largest_component']
  # Ctrl-C while the files are written: the earlier evaluation's files stay as they were, untouched.
  def files():
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
  written = files()

  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(evaluate, 'write_report', interrupted)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(config, copy)
  partial = copy / 'eval' / '.partial' / (atomic.mark('') + out.name)
  assert files() == written and (partial / 'metrics.json').exists()
  # ... and while the new one is moved into place, once the earlier one was moved aside.
  monkeypatch.undo()
  rename = pathlib.Path.rename

  def interrupted_rename(self, target):
    if self == partial:
      raise KeyboardInterrupt
    return rename(self, target)
  monkeypatch.setattr(pathlib.Path, 'rename', interrupted_rename)
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(config, copy)
  assert files() == written


def test_two_evaluations_of_a_step_at_once_keep_the_one_in_place_first(run, config, tmp_path, caplog,
                                                                       monkeypatch, dead_mark):
  """Two terminals watching a run: each evaluation writes its own folder; the one renamed into place last
  finds the other's there, keeps it and says so. A killed evaluation's folder is removed by the next."""
  workdir, _ = run
  copy = tmp_path / 'tiny'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  config.data.phantom_dir = str(workdir.parent / 'phantom')
  config.eval.checkpoint = '3'
  (copy / 'eval' / '.partial' / (dead_mark('') + '3')).mkdir(parents=True)
  final, rename = copy / 'eval' / '3', pathlib.Path.rename

  def the_other_first(self, target):  # the other evaluation's folder goes into place just before this one's
    if pathlib.Path(target) == final and self.parent.name == '.partial':
      final.mkdir()
      (final / 'metrics.json').write_text('{"the other": 1}')
    return rename(self, target)

  monkeypatch.setattr(pathlib.Path, 'rename', the_other_first)
  with caplog.at_level(logging.WARNING):
    assert evaluate.evaluate(config, copy) == final
  assert f'{final}: written by another evaluation of step 3 meanwhile; kept' in caplog.text
  assert (final / 'metrics.json').read_text() == '{"the other": 1}'
  assert sorted(p.name for p in (copy / 'eval').iterdir()) == ['3']


def test_a_store_another_run_renames_in_as_the_evaluation_starts_stops_it(run, config, tmp_path, monkeypatch):
  """Two runs on one data.cache_dir: a store renamed into place after the check of what the workdir trained
  on would be scored as its test set; the evaluation stops instead, before writing anything."""
  workdir, _ = run
  copy = tmp_path / 'tiny'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  config.data.phantom_dir = str(workdir.parent / 'phantom')
  check = pipeline.check_trained_on

  def and_another_runs_rebuild(workdir, store_dir, *splits, as_another_split=False):
    checked = check(workdir, store_dir, *splits)
    if splits:  # the check of a store about to be built
      return checked
    shutil.rmtree(tmp_path / 'stale', ignore_errors=True)
    shutil.copytree(store_dir, tmp_path / 'other')
    store_dir.rename(tmp_path / 'stale')
    (tmp_path / 'other').rename(store_dir)
    if as_another_split:  # the check read the other run's store: named as the rebuild it is
      raise CheckpointError(f'{store_dir}: its split of the cases is not the one {workdir} trained on')
    return checked

  for as_another_split in (False, True):
    monkeypatch.setattr(pipeline, 'check_trained_on',
                        functools.partial(and_another_runs_rebuild, as_another_split=as_another_split))
    with pytest.raises(DataError, match=r'tiny/slices: another run rebuilt this slice store '
                       r'\(data.cache_dir\) for other data or another split as this one started; give each '
                       'run a data.cache_dir of its own$'):
      evaluate.evaluate(config, copy)
    assert not (copy / 'eval').exists()


def test_a_checkpoint_removed_while_it_is_read_is_not_called_corrupt(tmp_path):
  """The training running in the workdir deletes a checkpoint an evaluation picked (its keep policy)."""
  step = tmp_path / '60'
  with pytest.raises(CheckpointError, match=r'/60: removed while it was read \(by the training running in '
                     r'this workdir, which keeps its newest and best checkpoints only\); run again'
                     ), checkpoints._unreadable_as_one_line(step):
    raise FileNotFoundError(f'Checkpoint at {step} not found.')
  step.mkdir()  # there, its files cut short
  with pytest.raises(CheckpointError, match='/60: unreadable or corrupt checkpoint'
                     ), checkpoints._unreadable_as_one_line(step):
    raise ValueError('a file cut short')


def test_figure_slices_are_each_cases_middle_not_the_edges():
  """Three test cases of 10, 10 and 4 slices with cartilage (rows of other slices between): four figure
  slices, two of the first case at a quarter and three quarters of its plates, one of each other at its
  middle; more than a case has, all of its slices."""
  rows = [{'case': case, 'cartilage': 0 < k < n + 1} for case, n in (('a', 10), ('b', 10), ('c', 4))
          for k in range(n + 2)]
  picked = sorted(evaluate.figure_slices(rows, 4))
  assert [(rows[i]['case'], i) for i in picked] == [('a', 3), ('a', 8), ('b', 18), ('c', 27)]
  assert len(evaluate.figure_slices(rows, 40)) == 24
  assert len(evaluate.figure_slices(rows, 2)) == 2
