"""Built-in synthetic knees: DESS-like sagittal MR volumes with OAI-ZIB labels, generated from a seed.

Anatomy is defined in millimetres around the volume centre (the joint centre), so a smaller shape or another
spacing shows the same knee cropped or resampled. Voxel order is OAI-ZIB's: axis 0 left-right (the sagittal
axis), axis 1 posterior->anterior, axis 2 inferior->superior, i.e. RAS, and the affine says so.
"""

import json
import logging
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from absl import app, flags
from scipy import ndimage

from easunet_jax import atomic
from easunet_jax.data import volumes
from easunet_jax.data.workers import cpus, map_in_order
from easunet_jax.errors import DataError

DEFAULT_SHAPE = (160, 384, 384)
DEFAULT_SPACING = (0.7, 0.3646, 0.3646)

# Tissue codes of the phantoms (this schematic one and `knee`'s real-anatomy one), written as tissues/<id>
# beside the labels for contrast synthesis (`data.synth`), and the OAI-ZIB label of each (1 femur, 2 FC,
# 3 tibia, 4 TC).
(AIR, FAT, MUSCLE, FEMUR, TIBIA, FEMUR_PLATE, TIBIA_PLATE, FC, TC, FLUID, MENISCUS, PATELLA, PATELLA_PLATE,
 PATELLA_CARTILAGE, TENDON) = range(15)
LABEL_OF_TISSUE = np.array([0, 0, 0, 1, 3, 1, 3, 2, 4, 0, 0, 0, 0, 0, 0], np.uint8)
_CHUNK = 16  # sagittal slices generated at once: bounds memory at full size
# Below this many voxels in all, one process is faster: a spawned worker imports its caller first (seconds).
_PARALLEL_MIN_VOXELS = 2 ** 25
PLATE_MM = 0.8  # subchondral bone plate, dark in DESS


def _knee(rng: np.random.Generator) -> dict:
  """One subject's anatomy and contrast (millimetres, radians, arbitrary intensity units)."""
  u = rng.uniform
  return dict(
      ox=u(-3, 3), oy=u(-1.5, 1.5), oz=u(-1.5, 1.5),  # joint centre offset from the volume centre
      w_med=u(27, 33), w_lat=u(25, 31), w_notch=u(14, 20),  # condyle and notch widths (left-right)
      a_ant=u(22, 25), a_post=u(18, 21), b=u(15, 18),  # condyle half-axes: anterior, posterior, vertical
      r_coronal=u(22, 30),  # coronal roundness of the condyles
      notch_h=u(14, 20), troch=np.deg2rad(u(40, 55)),  # notch roof height; trochlear cartilage start angle
      phi_ant=np.deg2rad(u(100, 110)), phi_post=np.deg2rad(u(105, 115)),  # femoral cartilage extent
      gap=u(0.7, 1.3),  # joint space between the cartilages at contact
      t_fc=u(2.2, 2.6), t_tc=u(2.0, 2.5), t_var=u(0.1, 0.2), phase=u(0, 2 * np.pi, 4),  # cartilage thickness
      shaft_hw=u(13, 16),  # femoral shaft half-width (anterior-posterior)
      plat_l=u(21, 25), plat_y=u(-3, 1), conc_med=u(0.5, 2.0), conc_lat=u(0.0, 0.8),  # tibial plateau
      spine_h=u(2, 5), men_h=u(5, 8), effusion=u(0, 1.2),  # tibial spines, meniscus height, fluid layer
      body_rx=u(54, 62), body_ry=u(52, 60),  # skin outline
      intensity=dess_intensities(rng),
      noise=u(0.03, 0.05), bias=u(-0.2, 0.2, 5), blur=u(0.5, 0.8),
  )


def dess_intensities(rng: np.random.Generator) -> np.ndarray:
  """A DESS-like intensity for every tissue code (arbitrary units): bright fluid and cartilage, grey fat,
  dark muscle, marrow in between, black cortical plates, menisci and tendons."""
  u = rng.uniform
  table = np.array([0.0, u(0.45, 0.6), u(0.1, 0.18), u(0.3, 0.42), u(0.3, 0.42), 0.08, 0.08,
                    u(0.55, 0.7), u(0.55, 0.7), u(0.85, 1.0), 0.06])
  # The real-anatomy phantom's codes take their look-alikes' values: no further draws, so the schematic
  # phantom's subjects stay what they were.
  patella = np.array([table[FEMUR], table[FEMUR_PLATE], table[FC], table[MENISCUS]])
  return np.concatenate([table, patella]) * u(200, 800)


def _slice_params(x: np.ndarray, k: dict) -> dict:
  """Per-sagittal-slice geometry for left-right positions x (mm): which condyle, its size, cartilage
  extent."""
  medial = x < k['ox']  # medial condyle on the left of the image (a right knee)
  w = np.where(medial, k['w_med'], k['w_lat'])
  xc = np.where(medial, k['ox'] - k['w_notch'] / 2 - k['w_med'] / 2,
                k['ox'] + k['w_notch'] / 2 + k['w_lat'] / 2)
  u = (x - xc) / (w / 2)  # -1..1 across the condyle
  outer = np.where(medial, u < 0, u > 0)
  notch = np.abs(x - k['ox']) < k['w_notch'] / 2
  dx = np.minimum(np.abs(x - xc), w / 2)
  rise = k['r_coronal'] - np.sqrt(k['r_coronal'] ** 2 - dx ** 2)  # rounded condyles in the coronal plane
  # Beyond the outer edge the condyle shrinks away (epicondyles: bone without cartilage).
  shrink = np.where(outer & (np.abs(u) > 1), np.sqrt(np.clip(1 - ((np.abs(u) - 1) / 0.15) ** 2, 0, 1)), 1.0)
  cart = np.sqrt(np.clip((0.92 - np.abs(u)) / 0.25, 0, 1))
  arch = k['notch_h'] * np.sqrt(np.clip(1 - ((x - k['ox']) / (k['w_notch'] / 2)) ** 2, 0, 1))
  return dict(notch=notch, rise=rise, shrink=shrink, cart=cart, arch=arch,
              troch=np.where(outer, cart, 1.0), tc=np.sqrt(np.clip((0.97 - np.abs(u)) / 0.25, 0, 1)),
              conc=np.where(medial, k['conc_med'], k['conc_lat']), condyle=~notch & (shrink > 0))


def _tissue(x: np.ndarray, y: np.ndarray, z: np.ndarray, k: dict) -> np.ndarray:
  """Tissue codes on the grid x (X,1,1), y (1,Y,1), z (1,1,Z) in mm from the volume centre."""
  s = {name: v[:, None, None] if v.ndim else v for name, v in _slice_params(x[:, 0, 0], k).items()}
  two_pi, ph = 2 * np.pi, k['phase']
  # Femur: a condyle (two half-ellipses in the sagittal plane) plus the shaft; the notch carved out.
  t_fc0 = k['t_fc'] * (1 + 0.5 * k['t_var'] * np.sin(two_pi * x / 40 + ph[1]))
  # The lowest femoral cartilage point lies gap / 2 above the joint centre (thickness there at phi = 0).
  zc = k['oz'] + k['gap'] / 2 + t_fc0 * (1 + k['t_var'] * np.sin(ph[0])) * s['cart'] + k['b'] + s['rise']
  # The condyle's anterior-posterior middle sits at oy, so the cartilage stays inside a 64 mm field of view.
  y_low = k['oy'] + (k['a_ant'] - k['a_post']) / 2
  dy, dz = y - y_low, z - zc
  a = np.where(dy > 0, k['a_ant'], k['a_post']) * s['shrink'] + 1e-3
  bb = k['b'] * s['shrink'] + 1e-3
  rho_n = np.sqrt((dy / a) ** 2 + (dz / bb) ** 2) + 1e-6  # 1 on the condyle surface
  rho = np.sqrt(dy ** 2 + dz ** 2)
  out = rho * (1 - 1 / rho_n)  # radial distance from the surface, negative inside
  phi = np.arctan2(dy, -dz)  # 0 at the lowest point, positive towards anterior
  carved = s['notch'] & (dy < 0.35 * k['a_ant']) & (dz < s['arch'] - bb)
  shaft = (dz > 0) & (np.abs(dy - 2) < k['shaft_hw'])
  femur = ((out < 0) | shaft) & ~carved
  t_fc = (t_fc0 * (1 + k['t_var'] * np.sin(2.5 * phi + ph[0]))
          * np.where(phi > k['troch'], s['troch'], s['cart']))
  phi_lo = np.where(s['notch'], k['troch'], -k['phi_post'])
  ends = np.sqrt(np.clip(np.minimum(phi - phi_lo, k['phi_ant'] - phi) / 0.3, 0, 1))
  fc = ~femur & (out >= 0) & (out < t_fc * ends)
  # Tibia: a slightly concave plateau with rounded edges, narrowing to the shaft; spines in the notch.
  ty = y - y_low - k['plat_y']
  length = k['plat_l']
  t_tc = k['t_tc'] * (1 + k['t_var'] * np.sin(two_pi * ty / 45 + ph[2])) * (1 + 0.5 * k['t_var'] * np.sin(
      two_pi * x / 35 + ph[3])) * s['tc'] * np.sqrt(np.clip((0.78 * length - np.abs(ty)) / 5, 0, 1))
  t_contact = (k['t_tc'] * (1 + k['t_var'] * np.sin(two_pi * -k['plat_y'] / 45 + ph[2]))
               * (1 + 0.5 * k['t_var'] * np.sin(two_pi * x / 35 + ph[3])) * s['tc'])
  z_p = k['oz'] - k['gap'] / 2 - t_contact
  edge = np.clip(np.abs(ty) - (length - 4), 0, 4)
  top = (z_p + s['conc'] * ((ty / length) ** 2 - (k['plat_y'] / length) ** 2) - (4 - np.sqrt(16 - edge ** 2))
         + k['spine_h'] * (s['arch'] / k['notch_h']) * np.exp(-(ty / 7) ** 2))
  depth = np.clip((z_p - z) / 30, 0, 1)
  half_lr = (k['w_med'] + k['w_lat'] + k['w_notch']) / 2 + 2
  tibia = (z <= top) & (np.abs(ty) < length - (length - 16) * depth) & (
      np.abs(x - k['ox']) < half_lr - (half_lr - 24) * depth)
  tc = (z > top) & (z <= top + t_tc)
  above = z - (top + t_tc)
  # Joint: fluid between the cartilages, wedge-shaped menisci at the periphery, a little effusion.
  free = ~femur & ~fc & ~tibia & ~tc
  men = free & s['condyle'] & (above > 0) & (np.abs(ty) < length) & (
      above < k['men_h'] * np.clip((np.abs(ty) - 0.45 * length) / (0.5 * length), 0, 1))
  joint_fluid = (above > 0) & (above < 1.5) & (dz < 0) & (np.abs(ty) < length) & s['condyle']
  effusion = (out >= t_fc) & (out < t_fc + k['effusion']) & (phi > 0.3) & (phi < k['phi_ant'])
  fluid = free & ~men & (joint_fluid | effusion)
  # Soft tissue: muscle inside the skin outline, a subcutaneous fat layer, fat anterior to the joint.
  body = np.sqrt(((x - k['ox']) / k['body_rx']) ** 2 + ((y - k['oy'] + 5) / k['body_ry']) ** 2)
  # Hoffa's fat pad, anterior to the joint.
  fat_pad = ((dy - length - 8) / 12) ** 2 + ((z - k['oz'] + 3) / 14) ** 2 < 1
  subcutaneous = (body > 1 - 7 / k['body_rx']) | fat_pad
  tissue = np.where(body < 1, np.where(subcutaneous, FAT, MUSCLE), AIR).astype(np.uint8)
  plate_f = femur & (((out > -PLATE_MM) & (dz < 0)) | (np.abs(np.abs(dy - 2) - k['shaft_hw']) < PLATE_MM))
  plate_t = tibia & (z > top - PLATE_MM)
  # Later codes win where masks overlap.
  for mask, code in ((femur, FEMUR), (plate_f, FEMUR_PLATE), (tibia, TIBIA), (plate_t, TIBIA_PLATE),
                     (fluid, FLUID), (men, MENISCUS), (fc, FC), (tc, TC)):
    tissue = np.where(mask, np.uint8(code), tissue)
  return tissue


def affine_for(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
  """RAS affine with the volume centre at the world origin."""
  affine = np.diag([*map(float, spacing), 1.0])
  affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
  return affine


def centred_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
  """Per axis of a volume of `shape`, its voxel centres in mm from the volume's centre (float64)."""
  return [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing)]


def render(tissue: np.ndarray, intensity: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, *,
           blur: float, bias: np.ndarray, noise: float) -> np.ndarray:
  """An MR-like image (float32) of a tissue-code volume: `intensity[code]`, partial volume (Gaussian blur of
  `blur` voxels), a smooth multiplicative bias field (`bias`: 5 coefficients, separable in the three axes)
  and Rician noise of `noise` times the brightest tissue."""
  shape = tissue.shape
  x, y, z = (axis.astype(np.float32) for axis in centred_mm(shape, spacing))
  image = intensity.astype(np.float32)[tissue]
  # Partial volume: about one voxel of blur in every axis (voxel units, so anisotropic in mm).
  image = ndimage.gaussian_filter(image, blur, truncate=3.0, output=np.float32)
  # Smooth multiplicative bias field, separable in the three axes (coil sensitivity).
  c = bias
  span = 70.0
  log_bias = (c[0] * x / span)[:, None, None] + (c[1] * y / span + c[3] * (y / span) ** 2)[None, :, None] + (
      c[2] * z / span + c[4] * (z / span) ** 2)[None, None, :]
  image *= np.exp(log_bias, dtype=np.float32)
  # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels.
  sigma = np.float32(noise * intensity.max())
  real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
  imag = sigma * rng.standard_normal(shape, dtype=np.float32)
  return np.sqrt(real * real + imag * imag)


def make_tissues(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One synthetic knee: image (float32), tissue codes (uint8) and the 4x4 RAS affine."""
  rng = np.random.default_rng(seed)
  k = _knee(rng)
  shape = tuple(int(n) for n in shape)
  x, y, z = (axis.astype(np.float32) for axis in centred_mm(shape, spacing))
  tissue = np.concatenate([_tissue(x[i:i + _CHUNK, None, None], y[None, :, None], z[None, None, :], k)
                           for i in range(0, shape[0], _CHUNK)])
  image = render(tissue, k['intensity'], spacing, rng, blur=k['blur'], bias=k['bias'], noise=k['noise'])
  return image, tissue, affine_for(shape, spacing)


def make_subject(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One synthetic knee: image (float32), OAI-ZIB labels (uint8) and the 4x4 RAS affine."""
  image, tissue, affine = make_tissues(seed, shape, spacing)
  return image, LABEL_OF_TISSUE[tissue], affine


def subject_seed(dataset_seed: int, i: int) -> int:
  """Seed of subject i of a dataset; it depends only on (dataset_seed, i): adding subjects keeps the
  others."""
  return int(np.random.SeedSequence([dataset_seed, i]).generate_state(1)[0])


Generator = Callable[[int, Sequence[int], Sequence[float]], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _write_subject(out_dir: pathlib.Path, case_id: str, seed: int, shape: Sequence[int],
                   spacing: Sequence[float], generator: Generator) -> str:
  """Generates one subject and writes its three files; returns its id (a worker process sends back only
  that)."""
  image, tissue, affine = generator(seed, shape, spacing)
  # Image last: a subject counts as written once its image exists.
  volumes.save_volume(out_dir / 'tissues' / f'{case_id}.nii.gz', tissue, affine)
  volumes.save_volume(out_dir / 'labels' / f'{case_id}.nii.gz', LABEL_OF_TISSUE[tissue], affine)
  volumes.save_volume(out_dir / 'images' / f'{case_id}.nii.gz', image, affine)
  return case_id


def write_dataset(out_dir: str | pathlib.Path, num: int, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING, seed: int = 0, *,
                  workers: int | None = None, generator: Generator = make_tissues,
                  made_by: dict | None = None) -> list[str]:
  """Writes images/<id>.nii.gz, labels/<id>.nii.gz and tissues/<id>.nii.gz (tissue codes, for data.synth)
  for num subjects of `generator` (this schematic phantom, or `knee.make_tissues`); existing complete files
  are kept.

  Subjects are generated in up to `workers` processes (None: one per CPU, or one process for a phantom
  smaller than _PARALLEL_MIN_VOXELS in all), each writing its own files, so memory holds at most
  `workers` subjects. Each subject's random numbers depend only on (seed, its index), so the files are the
  same for any number of workers. The generator is numpy and scipy.ndimage, both single-threaded here, so
  a worker uses one core.

  The folder's phantom.json records the seed, shape and spacing its subjects were made with, and `made_by`
  (what the generator draws: its anatomy and settings); a later call asking for others keeps them all the
  same, and says so, but refuses to add subjects to them (a DataError): a folder holds one kind of subject.
  """
  out_dir = pathlib.Path(out_dir)
  for folder in (out_dir, *(out_dir / kind for kind in ('images', 'labels', 'tissues'))):
    atomic.remove_left_by_dead(folder)  # the volumes a killed generation left half-written
  ids = [f'phantom_{i:03d}' for i in range(num)]
  todo = [i for i, case_id in enumerate(ids) if not all(
      (out_dir / kind / f'{case_id}.nii.gz').exists() for kind in ('images', 'labels', 'tissues'))]
  made_with = {'seed': int(seed), 'shape': [int(n) for n in shape], 'spacing': [float(s) for s in spacing],
               **(made_by or {})}
  record = out_dir / 'phantom.json'
  recorded = json.loads(record.read_text()) if record.exists() and len(todo) < num else made_with
  if len(todo) == num:  # no earlier subjects (where some are and no record, how they were made is unknown)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(record, json.dumps(made_with))
  # Compared on the fields both give: a record of an earlier version names no generator.
  elif any(made_with.get(k, v) != v for k, v in recorded.items()):
    if todo:
      raise DataError(f'{out_dir} holds phantoms made with {recorded}, not {made_with}, and {len(todo)} more '
                      'were asked for, which would mix the two in one data set: name a folder of its own '
                      '(data.phantom_dir), or ask for its settings')
    logging.warning('%s holds phantoms made with %s, not %s: its existing subjects are used as they are '
                    '(data.phantom_dir names a folder of its own)', out_dir, recorded, made_with)
  jobs = [(out_dir, ids[i], subject_seed(seed, i), tuple(shape), tuple(spacing), generator) for i in todo]
  if workers is None:
    workers = cpus() if len(jobs) * np.prod(shape) >= _PARALLEL_MIN_VOXELS else 1
  for n, case_id in enumerate(map_in_order(_write_subject, jobs, max(int(workers), 1))):
    logging.info('phantom %d/%d: %s', n + 1, len(jobs), case_id)
  if (held := len(list((out_dir / 'labels').glob('phantom_*.nii.gz')))) > num:
    logging.warning('%s holds %d phantom subjects, more than the %d asked for: a data set is every subject '
                    'of its folder (data.phantom_dir names a folder of its own)', out_dir, held, num)
  return ids


def cli(generator: Callable[[], Generator] = lambda: make_tissues) -> None:
  """python -m easunet_jax.data.phantom --out DIR --num N [--shape 160,384,384] [--spacing ...] [--seed 0]
  [--workers N]; `knee` runs it with its own generator. `generator()` is called once flags are parsed."""
  # Flags are defined here, not at import, so importing this module adds nothing to a program's flags.
  out = flags.DEFINE_string('out', None, 'output folder (images/, labels/ and tissues/ are created in it)',
                            required=True)
  num = flags.DEFINE_integer('num', 20, 'number of subjects')
  shape = flags.DEFINE_list('shape', [str(n) for n in DEFAULT_SHAPE],
                            'voxels: left-right, anterior, superior')
  spacing = flags.DEFINE_list('spacing', [str(d) for d in DEFAULT_SPACING], 'voxel size in mm')
  seed = flags.DEFINE_integer('seed', 0, 'dataset seed')
  workers = flags.DEFINE_integer('workers', None, 'worker processes; default one per CPU (one for a small '
                                 'phantom)', lower_bound=1)

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if len(shape.value) != 3 or len(spacing.value) != 3:
      raise app.UsageError('--shape and --spacing take three comma-separated values')
    ids = write_dataset(out.value, num.value, tuple(map(int, shape.value)), tuple(map(float, spacing.value)),
                        seed.value, workers=workers.value, generator=generator())
    print(f'{len(ids)} phantom subjects in {out.value}')

  app.run(main)


if __name__ == '__main__':
  cli()
