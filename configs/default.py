"""Every configuration field, grouped, with one comment each. Other configs import and override this."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'default'  # run name; --workdir defaults to runs/<name>
  c.seed = 0  # seeds model init, data splits, the data order and the phantom's subjects

  c.data = d = ml_collections.ConfigDict()
  d.root = ''  # dataset root (images/+labels/ or imagesTr/+labelsTr/); '' = the built-in phantom
  # (source label, training class) pairs; the bone labels (1, 3) and 0 are background, any other value a
  # label map holds and the pairs do not name skips its case (map it to class 0 to make it background)
  d.label_map = ((2, 1), (4, 2))
  d.split = (0.7, 0.1, 0.2)  # train / val / test fractions of subjects (seeded by c.seed)
  d.split_file = ''  # JSON {"train": [...], "val": [...], "test": [...]} of case ids; overrides split
  d.train_slices = 'cartilage'  # 'cartilage' (slices with a cartilage label, the paper) or 'all'
  d.cache_dir = ''  # slice store; '' = <workdir>/slices
  d.augment = True  # random rotation / scale / translation / gamma / intensity of training slices, on device
  d.augment_rotate_deg = 10.0  # the augmentation's rotations: within +-this many degrees (sagittal pose)
  # Contrast synthesis: each training image drawn afresh from its tissue map on the devices (data/synth.py);
  # trains on label maps alone (data.root with labels/ only) as well.
  d.synth = False
  d.workers = 0  # Grain worker processes (0 = load in the training process)
  # Where the phantom is generated once; '' = beside the workdir: phantom_<shape>/ (phantom_160x384x384/),
  # or for 'reference' anatomy phantom_reference[_oa<fraction>][_elastic<mm>][_effusion<mm>]_<shape>/.
  d.phantom_dir = ''
  d.phantom_anatomy = 'schematic'  # 'schematic' shapes | 'reference': knees warped from a real label map
  d.phantom_num = 20  # phantom subjects
  # 'reference' only: the fraction of subjects that are osteoarthritic (thinner plates, focal defects)
  d.phantom_oa_fraction = 0.0
  # 'reference' only: the elastic field's standard deviation (mm), how far subjects' shapes stray from it
  d.phantom_elastic_mm = 1.5
  # 'reference' only: the deepest large effusion (mm of fluid around the femur, in front and behind, each
  # drawn from 0 to it per subject); 0 = none, only the thin fluid of every knee
  d.phantom_effusion_mm = 0.0
  d.phantom_shape = (160, 384, 384)  # phantom voxels (left-right, then the sagittal plane), OAI-ZIB's
  d.phantom_spacing = (0.7, 0.3646, 0.3646)  # phantom voxel size in mm, OAI-ZIB's

  c.model = m = ml_collections.ConfigDict()
  m.name = 'eas_unet'  # network: 'eas_unet' | 'unet' | 'unetpp' (U-Net++) | 'attention_unet'
  m.features = (32, 64, 128, 256, 512)  # widths of the five encoder stages
  m.num_classes = 3  # background, femoral cartilage, tibial cartilage (the only classes scored: fixed)
  m.aspp_rates = (6, 12, 18)  # dilations of the EAS module's atrous branches
  # 'auto' | 'native' (C++, CPU training) | 'shift' (shifted multiply-adds) | 'xla' | 'pallas' (GPU)
  m.depthwise_impl = 'auto'
  m.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (parameters stay float32)
  # EAS U-Net ablations (other networks refuse a non-default value); the defaults are the paper's network.
  m.block = 'separable'  # encoder/decoder blocks: 'separable' (DS) | 'standard' (3x3 conv, BN, h-swish)
  m.eca = True  # ECA on the EAS module's 1x1 branch; False = plain ASPP branch
  m.eas = True  # the EAS (ECA-ASPP) module at the bottleneck; False = e5 goes straight to the decoder
  m.fusion = 'concat'  # side outputs fused by 'concat' + 1x1 conv (the paper) | 'add' (their sum)
  # Side outputs: eas_unet's d1..d4 heads + fusion (False: one 1x1 head on d1); unetpp's heads on
  # X^{0,1..3} (True needs 3 loss.side_weights, Zhou's: (1, 1, 1)); unet, attention_unet have none.
  m.deep_supervision = True

  c.loss = ml_collections.ConfigDict()
  c.loss.side_weights = (0.5, 0.25, 0.125, 0.0625)  # deep-supervision weights of side outputs d1..d4
  c.loss.dice_eps = 1e-5  # smoothing of the soft Dice

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 0.01  # SGD learning rate
  o.momentum = 0.9  # SGD momentum (PyTorch semantics)
  o.weight_decay = 1e-4  # coupled L2 decay on all parameters, applied before momentum (PyTorch SGD)
  o.schedule = 'constant'  # 'constant' | 'poly' (lr * (1 - step / num_steps) ** 0.9)

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16  # global batch; must divide by the device count, at least 2 (EAS BatchNorm)
  t.num_epochs = 50  # passes over the training slices; sets num_steps when that is 0
  t.num_steps = 0  # total optimiser steps; 0 = from num_epochs and the training-set size
  t.eval_every_steps = 500  # validation period
  t.distributed = False  # call jax.distributed.initialize() (multi-host)
  # Non-finite loss or gradients: 'stop' the run (naming the step) or 'skip' the update (stopping once 100
  # or more were skipped in a row, counted in whole logging periods).
  t.nan_policy = 'stop'
  # A model file (--mode=export; the shipped one: easunet_jax/weights/eas_knee.npz) whose weights and batch
  # statistics start a new run: fine-tuning. The optimiser starts afresh; a resumed run ignores it.
  t.init_weights = ''

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16  # slices per validation and evaluation batch (padded to the device count)
  c.eval.checkpoint = 'best'  # evaluated checkpoint: 'best' (validation Dice), 'latest' or a step
  c.eval.largest_component = False  # keep each class's largest connected component (as nnU-Net)
  c.eval.num_figure_slices = 4  # test slices with cartilage drawn in overlays.png

  c.predict = ml_collections.ConfigDict()
  c.predict.label_values = 'compact'  # written labels: 'compact' (0/1/2) or 'oai-zib' (0/2/4) for BG/FC/TC
  c.predict.resample = True  # resample each sagittal slice to the training pixel size, and the mask back
  # Class probabilities averaged over sampling grids offset by half a network pixel along each in-plane axis
  # where the network's pixels are coarser than the scan's: finer boundaries for up to 4x the forward passes.
  c.predict.subpixel_tta = True
  # Class probabilities smoothed across sagittal slices by a Gaussian of this sigma (mm) before the argmax:
  # the 2D network's slices agree, a lone speck or gap in one slice is outvoted; 0 = off.
  c.predict.slice_sigma_mm = 1.0
  c.predict.min_component_mm3 = 100.0  # cartilage specks smaller than this (3D components) dropped; 0 = off
  # ... and components smaller than this fraction of their class's largest (a ghost beside the plate); 0 = off
  c.predict.min_component_fraction = 0.1
  c.predict.batch_size = 16  # slices per forward pass (rounded up to the device count)
  # With predict.resample, the in-plane mm the model was trained at; 0 = median of the train slice store.
  c.predict.spacing = (0.0, 0.0)
  # With predict.resample, slices resampled to that pixel size divided by this zoom: the anatomy this much
  # larger than in training (whose zoom augmentation spans 0.9-1.1), thin cartilage over more network pixels.
  c.predict.zoom = 1.0
  # The background's probability is multiplied by this before the argmax: above 1, cartilage only where the
  # network is that much surer of it; it trims plates drawn too thick (bench/calibrate.py scores weights).
  c.predict.background_weight = 1.0
  # Run the network on a few central slices in each of the eight in-plane orientations and segment in the
  # one where it is far surer of cartilage than in the header's: a header that flips or swaps the knee's
  # in-plane axes (written by a conversion that lost the geometry) still gives a true mask, with a warning.
  # Unless the left-right voxels are much coarser than the others, every axis is tried as left-right (24
  # orientations); sagittal slices are also tried rotated by 15 and 30 degrees either way. False: none.
  c.predict.orientation_check = True

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # checkpoint period (also at every validation and at the end)
  c.checkpoint.keep = 2  # latest checkpoints kept, besides the best by validation Dice

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50  # period of the progress line and training scalars
  return c
