"""Real-anatomy phantom: knees built from one real knee label map, the reference knee in `reference/`
(femur, femoral cartilage, tibia and tibial cartilage of a right knee, 3D DESS geometry; from pymskt, MIT:
see reference/NOTICE.md).

Each subject is the reference with its cartilage thickened or thinned (a factor per plate), warped by a random
affine (size, rotations) and a smooth elastic field, its joint space widened or narrowed, mirrored into a left
knee half of the time, then resampled into the requested grid. An osteoarthritic subject (`make_tissues`'s
`oa_fraction`) has thinner plates, a narrower joint space and focal defects of its weight-bearing cartilage,
filled with joint fluid. A subject may have a large effusion (`make_tissues`'s `effusion_mm`): fluid
around the femur in the suprapatellar pouch and the posterior recesses. The soft tissue is placed around
those bones and plates from distances to them: cortical plates, a patella with its cartilage, tendons,
menisci, joint fluid and effusion, Hoffa's and popliteal fat, muscle, subcutaneous fat, air. The result
is a tissue-code volume (`phantom`'s codes), rendered DESS-like or TSE-like by `phantom.render`.

Voxel order and affine as the schematic phantom: axis 0 left-right, RAS, the volume centre at the origin.
"""

import functools
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from easunet_jax import measures
from easunet_jax.data import phantom

REFERENCE = pathlib.Path(__file__).resolve().parent / 'reference' / 'knee_labels_oaizib.nii.gz'
CONTRASTS = ('dess', 'tse')
_MARGIN_MM = 6.0  # cartilage may grow this far from where it is in the reference
_CHUNK = 16  # sagittal slices resampled at once: bounds the memory of the coordinate arrays
ELASTIC_MM = 1.5  # standard deviation of the elastic field's bumps: how far shapes stray from the reference
DEFECT = 5  # label of a cartilage defect between `with_defects` and `_tissues` (joint fluid)
_WEIGHT_BEARING_MM = 8.0  # femoral defects lie this far above the plate's lowest point at most
_EFFUSION_REACH_MM = 40.0  # a large effusion fills the recesses this near the femoral cartilage


@functools.cache
def reference() -> tuple[np.ndarray, np.ndarray]:
  """(OAI-ZIB labels in RAS voxel order, spacing in mm) of the reference knee."""
  nii = nib.as_closest_canonical(nib.load(REFERENCE))
  return np.asarray(nii.dataobj).astype(np.uint8), np.array(nii.header.get_zooms()[:3], np.float64)


@functools.cache
def _thickness_fields() -> tuple[tuple[slice, ...], dict[int, tuple[np.ndarray, ...]]]:
  """Per cartilage label, inside a box around the cartilage: each voxel's distance (mm) to the plate's bone,
  its distance to the plate, and the plate's local thickness (`measures.thickness_map_mm`) at the nearest
  plate voxel."""
  labels, spacing = reference()
  cartilage = np.argwhere((labels == 2) | (labels == 4))
  margin = np.ceil(_MARGIN_MM / spacing).astype(int)
  lo = np.maximum(cartilage.min(0) - margin, 0)
  hi = np.minimum(cartilage.max(0) + margin + 1, labels.shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  crop = labels[box]
  fields = {}
  for bone, plate in ((1, 2), (3, 4)):
    to_bone = ndimage.distance_transform_edt(crop != bone, spacing)
    to_plate, nearest = ndimage.distance_transform_edt(crop != plate, spacing, return_indices=True)
    # Exact ties, as the phantoms were first drawn: a tolerance moves under 1 % of their cartilage voxels,
    # but every test knee of the benches and every figure measured on them would move with it.
    local, _ = measures.thickness_map_mm(crop == plate, spacing, tie_tolerance=0)
    fields[plate] = (to_bone.astype(np.float32), to_plate.astype(np.float32), local[tuple(nearest)])
  return box, fields


def scaled_cartilage(fc_scale: float, tc_scale: float) -> np.ndarray:
  """The reference labels with each plate's local thickness times its factor: cartilage is where the distance
  to the plate's bone is at most factor x the local thickness, within (factor - 1) x that thickness of the
  reference plate (so that it grows over its own bone only). Bone keeps its voxels and femoral cartilage
  wins where the two plates would meet."""
  labels, spacing = reference()
  box, fields = _thickness_fields()
  out = labels.copy()
  crop = out[box]
  bone = (crop == 1) | (crop == 3)
  crop[~bone] = 0
  # Voxel centres lie half a voxel inside the surfaces: the outermost voxel of a plate of thickness T is
  # about T from the nearest bone voxel's centre; half an in-plane pixel of slack keeps most of them at
  # factor 1 (not all: 98 % of FC's volume, 97 % of TC's; docs/design.md).
  slack = spacing[1:].min() / 2
  for plate, scale in ((2, fc_scale), (4, tc_scale)):
    to_bone, to_plate, thickness = fields[plate]
    keep = (to_bone <= scale * thickness + slack) & (to_plate <= max(scale - 1, 0) * thickness + slack)
    crop[~bone & (crop == 0) & keep] = plate
  return out


def _draw(rng: np.random.Generator, elastic_mm: float) -> dict:
  """One subject's variation (mm, radians, factors); ranges in docs/design.md."""
  u = rng.uniform
  return dict(
      left=bool(rng.random() < 0.5), scale=u(0.88, 1.12) * u(0.95, 1.05, 3),  # bone size, per axis
      angles=np.deg2rad([u(-10, 10), u(-4, 4), u(-6, 6)]),  # flexion, varus-valgus, rotation
      shift=u(-4, 4, 3), elastic=rng.normal(0, elastic_mm, (3, 5, 5, 5)),  # mm
      fc_scale=u(0.75, 1.25), tc_scale=u(0.75, 1.25), joint=u(-0.3, 1.2),
      skin=u(12, 22), posterior=u(20, 45), fat=u(3, 10), effusion=u(0, 2.5), meniscus=u(4.5, 7.5),
      patella=np.array([u(19, 24), u(9, 11), u(17, 21)]), patella_cartilage=u(2.5, 3.5),
      patella_lift=u(0, 8))


def _draw_oa(rng: np.random.Generator) -> dict:
  """An osteoarthritic subject's changes to `_draw`'s: plates thinned by 20-55 %, the joint space narrowed
  (the bones closer, as the cartilage between them is lost), and 1-3 focal defects per plate, each (plate
  label, where on its weight-bearing part as a quantile of its voxels, radius mm, the fraction of the local
  thickness left: 0 half of the time, a full-thickness defect)."""
  u = rng.uniform
  return dict(fc_scale=u(0.45, 0.8), tc_scale=u(0.45, 0.8), joint=u(-1.5, 0.0),
              defects=[(plate, rng.random(), u(3, 8), 0.0 if rng.random() < 0.5 else u(0.2, 0.6))
                       for plate in (2, 4) for _ in range(rng.integers(1, 4))])


def with_defects(labels: np.ndarray, scales: dict[int, float],
                 defects: Sequence[tuple[int, float, float, float]]) -> np.ndarray:
  """`labels` (the reference grid, `scaled_cartilage`'s with the thickness factor of each plate label in
  `scales`) with focal defects (`_draw_oa`'s): within the radius of a centre on the plate, cartilage farther
  from its bone than the fraction left of its local thickness becomes DEFECT. Femoral centres lie on the
  distal, weight-bearing condyles (within _WEIGHT_BEARING_MM of the plate's lowest point), tibial ones
  anywhere on the plateau."""
  reference_labels, spacing = reference()
  box, fields = _thickness_fields()
  out = labels.copy()
  crop = out[box]
  plates = reference_labels[box]
  for plate, quantile, radius, left in defects:
    candidates = np.argwhere(plates == plate)
    if plate == 2:
      candidates = candidates[candidates[:, 2] <= candidates[:, 2].min() + _WEIGHT_BEARING_MM / spacing[2]]
    centre = candidates[min(int(quantile * len(candidates)), len(candidates) - 1)]
    near = sum(((np.arange(n) - c) * d).reshape([-1 if a == axis else 1 for a in range(3)]) ** 2
               for axis, (n, c, d) in enumerate(zip(crop.shape, centre, spacing))) <= radius ** 2
    to_bone, _, thickness = fields[plate]
    crop[near & (crop == plate) & (to_bone > left * scales[plate] * thickness)] = DEFECT
  return out


def _warp(labels: np.ndarray, ref_spacing: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
          k: dict) -> np.ndarray:
  """The reference labels resampled (nearest) into the output grid through the subject's inverse map:
  output mm -> mirror -> inverse affine about the joint centre -> elastic field -> joint-space shift."""
  cartilage = np.argwhere((labels == 2) | (labels == 4)) * ref_spacing
  fc_low = np.argwhere(labels == 2)[:, 2].min() * ref_spacing[2]
  tc_top = np.argwhere(labels == 4)[:, 2].max() * ref_spacing[2]
  centre = np.array([*cartilage[:, :2].mean(0), (fc_low + tc_top) / 2])
  inverse = np.linalg.inv(Rotation.from_euler('XYZ', k['angles']).as_matrix() * k['scale'])
  axes = phantom.centred_mm(shape, spacing)
  # Elastic field: 5 Gaussian bumps per axis over the field of view, separable, in mm.
  bases = [np.exp(-0.5 * ((a[:, None] - np.linspace(a[0], a[-1], 5)[None]) / (max(a[-1] - a[0], 1) / 4)) ** 2)
           for a in axes]
  out = np.empty(tuple(shape), np.uint8)
  for start in range(0, shape[0], _CHUNK):
    x = axes[0][start:start + _CHUNK]
    q = np.stack(np.meshgrid(-x if k['left'] else x, axes[1], axes[2], indexing='ij'))
    q -= k['shift'][:, None, None, None]
    p = np.einsum('ij,jxyz->ixyz', inverse, q)
    p += np.einsum('cijk,xi,yj,zk->cxyz', k['elastic'], bases[0][start:start + _CHUNK], bases[1], bases[2],
                   optimize=True)
    # Below the joint line the tibia is sampled from higher up: it moves down, the joint space widens.
    p[2] += k['joint'] / (1 + np.exp(np.clip(p[2] / 1.0, -50, 50)))
    p += centre[:, None, None, None]
    out[start:start + _CHUNK] = ndimage.map_coordinates(labels, p / ref_spacing[:, None, None, None], order=0,
                                                        mode='nearest')
  return out


def _edt(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
  """Distance (mm) of every voxel to the nearest voxel of `mask` (inf when it is empty)."""
  if not mask.any():
    return np.full(mask.shape, np.inf, np.float32)
  return ndimage.distance_transform_edt(~mask, spacing).astype(np.float32)


def _tissues(labels: np.ndarray, spacing: Sequence[float], k: dict) -> np.ndarray:
  """Tissue codes around a subject's bones and cartilage (labels 1-4 in its own grid)."""
  P = phantom
  x, y, z = np.meshgrid(*(axis.astype(np.float32) for axis in phantom.centred_mm(labels.shape, spacing)),
                        indexing='ij', sparse=True)
  femur, fc, tibia, tc = (labels == v for v in (1, 2, 3, 4))
  tissue = np.zeros(labels.shape, np.uint8)
  d_femoral, d_tibial = _edt(femur | fc, spacing), _edt(tibia | tc, spacing)
  if not fc.any():
    return np.select([femur, tibia, tc], [P.FEMUR, P.TIBIA, P.TC], P.AIR).astype(np.uint8)
  fc_z, tc_z = z[0, 0, fc.any((0, 1))], z[0, 0, tc.any((0, 1))]
  joint = np.array([x[fc.any((1, 2))].mean(), y[0, fc.any((0, 2)), 0].mean(),
                    (fc_z.min() + tc_z.max()) / 2 if tc_z.size else fc_z.min()])
  # Patella: an ellipsoid over the trochlea (the most anterior femoral cartilage), cut to the femur's shape:
  # a millimetre of fluid, then its cartilage, then bone.
  trochlea = fc & (y >= np.percentile(y[0, :, 0][fc.any((0, 2))], 90))
  tx = x[trochlea.any((1, 2))].mean()
  cz = z[0, 0, trochlea.any((0, 1))].mean() + k['patella_lift']
  a, b, c = k['patella']
  t = k['patella_cartilage']
  femoral = (femur | fc) & (np.abs(x - tx) < a / 2) & (np.abs(z - cz) < c / 2)
  fronts = np.where(femoral, y, -np.inf).max(axis=(1, 2))
  front = np.median(fronts[np.isfinite(fronts)]) if femoral.any() else y.max() / 2
  centre = np.array([tx, front + 0.5 * b, cz])
  inside = ((x - centre[0]) / a) ** 2 + ((y - centre[1]) / b) ** 2 + ((z - centre[2]) / c) ** 2 < 1
  free = ~(femur | fc | tibia | tc)
  patella = inside & free & (d_femoral > 1.0 + t)
  patella_cartilage = inside & free & (d_femoral > 1.0) & ~patella & (y < centre[1])
  knee = ~free | patella | patella_cartilage
  d_knee = _edt(knee, spacing)
  # Soft tissue: thicker behind the knee (muscles of the calf and thigh) than in front.
  skin = k['skin'] + k['posterior'] * np.clip((joint[1] - y) / 50, 0, 1)
  body = d_knee < skin
  tissue[body] = P.MUSCLE
  tissue[body & (d_knee > skin - k['fat'])] = P.FAT
  near_joint = (d_femoral < 22) & (d_tibial < 22) & free
  hoffa = near_joint & (y > joint[1] + 12) & (z < centre[2] - c)
  popliteal = near_joint & (y < joint[1] - 18) & (d_knee > 4)
  tissue[body & (hoffa | popliteal)] = P.FAT
  # Tendons: quadriceps above the patella, patellar tendon from its lower pole to the tibial tuberosity.
  lr = np.abs(x - centre[0]) < 0.7 * a
  lower = centre[1] + 0.3 * b, centre[2] - c
  tuberosity_z = lower[1] - 45
  tibia_front = np.where(tibia, y, -np.inf).max(axis=(0, 2))
  tibia_front = tibia_front[np.isfinite(tibia_front)].max() if np.isfinite(tibia_front).any() else lower[0]
  s = np.clip((z - lower[1]) / (tuberosity_z - lower[1]), 0, 1)
  tendon_y = lower[0] + s * (tibia_front + 2 - lower[0])
  patellar_tendon = lr & (np.abs(y - tendon_y) < 2.5) & (z < lower[1]) & (z > tuberosity_z)
  quadriceps = lr & (np.abs(y - (centre[1] - 0.1 * b - (z - centre[2] - c) * 0.15)) < 3.0) & (
      z > centre[2] + 0.6 * c) & (z < centre[2] + c + 45)
  tissue[(patellar_tendon | quadriceps) & free & ~patella & ~patella_cartilage] = P.TENDON
  # Joint: menisci where the femoral and tibial surfaces are a few millimetres apart, fluid where they
  # nearly touch, a thin film over all cartilage, effusion over the trochlea and in the suprapatellar pouch.
  gap = d_femoral + d_tibial
  # The narrowest joint space of each sagittal slice is where the condyle meets the plateau: fluid there,
  # menisci where the surfaces draw apart at the edges.
  in_joint = free & (np.abs(z - joint[2]) < 10)
  contact = np.where(in_joint, gap, np.inf).min(axis=(1, 2), keepdims=True)
  contact = np.where(np.isfinite(contact), contact, 0)
  meniscus = in_joint & (d_tibial < k['meniscus']) & (gap > contact + 1.2) & (gap < contact + k['meniscus'])
  d_cartilage = _edt(fc | tc | patella_cartilage, spacing)
  effusion = (d_femoral < k['effusion']) & (y > joint[1])
  if 'large_effusion' in k:
    # Fluid distends the recesses around the femur, in front (the suprapatellar pouch) and behind (the
    # posterior recesses over the condyles), each to a depth of its own, inside the body; it stays off the
    # tibia and the tendons.
    front, back = k['large_effusion']
    near = body & (d_tibial > 2) & (_edt(fc, spacing) < _EFFUSION_REACH_MM) & (tissue != P.TENDON)
    effusion |= near & (d_femoral < np.where(y > joint[1], front, back))
  fluid = free & ((in_joint & (gap <= contact + 1.2)) | (d_cartilage < 0.5) | effusion)
  tissue[fluid | (labels == DEFECT)] = P.FLUID
  tissue[meniscus & (labels != DEFECT)] = P.MENISCUS
  tissue[patella] = P.PATELLA
  tissue[patella & (_edt(~patella, spacing) < phantom.PLATE_MM)] = P.PATELLA_PLATE
  tissue[patella_cartilage] = P.PATELLA_CARTILAGE
  # Bone: marrow inside a dark cortical plate; cartilage last.
  for bone, marrow, plate in ((femur, P.FEMUR, P.FEMUR_PLATE), (tibia, P.TIBIA, P.TIBIA_PLATE)):
    tissue[bone] = marrow
    tissue[bone & (_edt(~bone, spacing) < phantom.PLATE_MM)] = plate
  tissue[fc] = P.FC
  tissue[tc] = P.TC
  return tissue


def tse_intensities(rng: np.random.Generator) -> np.ndarray:
  """A proton-density TSE-like intensity for every tissue code: bright fat and fatty marrow, grey
  cartilage, fluid brighter than cartilage, dark muscle; black plates, menisci and tendons."""
  u = rng.uniform
  marrow, cartilage = u(0.7, 0.85), u(0.4, 0.5)
  table = [0.0, u(0.85, 1.0), u(0.2, 0.3), marrow, marrow, 0.06, 0.06, cartilage, cartilage, u(0.6, 0.75),
           0.05, marrow, 0.06, cartilage, 0.05]
  return np.array(table) * u(200, 800)


def make_tissues(seed: int, shape: Sequence[int] = phantom.DEFAULT_SHAPE,
                 spacing: Sequence[float] = phantom.DEFAULT_SPACING, contrast: str = 'dess',
                 oa_fraction: float = 0.0, elastic_mm: float = ELASTIC_MM, effusion_mm: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One real-anatomy subject: image (float32, `contrast` 'dess' or 'tse'), tissue codes (uint8) and the
  4x4 RAS affine. With probability `oa_fraction` the subject is osteoarthritic (`_draw_oa`), decided by
  random numbers of their own, so that a subject's other draws do not depend on it. `elastic_mm` scales
  the elastic field (the same draws, so the subject's shape changes the more the larger it is). With
  `effusion_mm` > 0 the subject has a large effusion, its depth in front of the femur and behind it each
  drawn from 0 to `effusion_mm`, from random numbers of their own as well."""
  if contrast not in CONTRASTS:
    raise ValueError(f'contrast: expected one of {CONTRASTS}, got {contrast!r}')
  rng = np.random.default_rng(seed)
  k = _draw(rng, elastic_mm)
  oa_rng = np.random.default_rng([seed, 7])
  oa = oa_rng.random() < oa_fraction
  if oa:
    k |= _draw_oa(oa_rng)
  if effusion_mm:
    k['large_effusion'] = np.random.default_rng([seed, 11]).uniform(0, effusion_mm, 2)
  _, ref_spacing = reference()
  labels = scaled_cartilage(k['fc_scale'], k['tc_scale'])
  if oa:
    labels = with_defects(labels, {2: k['fc_scale'], 4: k['tc_scale']}, k['defects'])
  labels = _warp(labels, ref_spacing, shape, spacing, k)
  tissue = _tissues(labels, spacing, k)
  return render(tissue, spacing, rng, contrast), tissue, phantom.affine_for(shape, spacing)


def render(tissue: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, contrast: str
           ) -> np.ndarray:
  """A `contrast` ('dess' or 'tse') image of a tissue-code volume, with random intensities, blur, bias
  field and noise (`phantom.render`)."""
  intensity = phantom.dess_intensities(rng) if contrast == 'dess' else tse_intensities(rng)
  return phantom.render(tissue, intensity, spacing, rng, blur=rng.uniform(0.5, 0.8),
                        bias=rng.uniform(-0.2, 0.2, 5), noise=rng.uniform(0.03, 0.05))


if __name__ == '__main__':
  # python -m easunet_jax.data.knee --out DIR [--contrast dess|tse] and the flags of the schematic phantom's
  # command line.
  from absl import flags

  _contrast = flags.DEFINE_enum('contrast', 'dess', list(CONTRASTS), 'the rendering')
  phantom.cli(lambda: functools.partial(make_tissues, contrast=_contrast.value))
