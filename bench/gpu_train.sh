#!/usr/bin/env bash
# The shipped model's recipe (configs/eas.py:knee) trained further on one lent GPU, inside a device session's
# budget (15 minutes, the machine's start included; README, "The shipped model"):
#
#   bash bench/gpu_train.sh wheels     # here, once: the wheels the GPU image lacks, into .whl/ (10 MB)
#   bash bench/gpu_train.sh train      # there, carrying .whl: train, then $OUT/eas_knee.npz
#
# `train` installs the carried wheels beside the image's jax and flax, has main.py write GPU_TRAIN_PHANTOMS
# real-anatomy phantoms (one process per CPU; a fraction GPU_TRAIN_OA of them osteoarthritic, their shapes
# strayed from the reference knee by an elastic field of GPU_TRAIN_ELASTIC_MM, as the shipped model's last
# fine-tuning) and train from the shipped weights for GPU_TRAIN_STEPS SGD steps of batch
# GPU_TRAIN_BATCH (poly schedule from GPU_TRAIN_LR), sends it SIGTERM after GPU_TRAIN_S seconds if it is
# slower than planned (it saves the step in flight and exits), and exports the newest checkpoint to
# $OUT/eas_knee.npz beside the run's metrics.jsonl and log ($OUT defaults to runs/gpu_train). Any further
# flag goes to both main.py calls. Back here, `python bench/transfer.py --weights=<that file>` says whether
# it beats the shipped file.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  wheels)
    # The versions requirements.txt pins, and those of grain's dependencies the image lacks.
    pins=$(grep -iE '^(nibabel|grain|clu|ml_collections|tensorboardX|pydicom)==' requirements.txt)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl $pins array_record==0.8.6 portpicker==1.6.0
    ls .whl
    ;;
  train)
    shift
    OUT=${OUT:-runs/gpu_train}
    RUN=${GPU_TRAIN_DIR:-/tmp/easunet_gpu_train}/run
    rm -rf "$(dirname "$RUN")" /tmp/easunet_site
    mkdir -p "$OUT"
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/easunet_site \
        .whl/*.whl
      export PYTHONPATH=/tmp/easunet_site:$PWD
    fi
    # The GPU or nothing: a CUDA plugin that fails to start would otherwise leave JAX on the CPU, training
    # the lease away at a CPU's pace.
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}  # JAX_PLATFORMS=cpu: a rehearsal on a CPU
    # A missing package (no .whl carried) or no GPU stops here, seconds into the lease rather than minutes,
    # in one line; the versions and devices go on record.
    python3 -c 'import sys
try:
  import jax, flax, optax, orbax.checkpoint, grain, clu.metrics, ml_collections
  import nibabel, tensorboardX, pydicom
except ImportError as e:
  sys.exit(f"gpu_train: {e}: run `bash bench/gpu_train.sh wheels` here and carry .whl")
try:
  devices = jax.devices()
except Exception as e:
  sys.exit(f"gpu_train: JAX finds no {jax.config.jax_platforms} device ({e!r})")
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "orbax", orbax.checkpoint.__version__, "grain", grain.__version__, devices)'
    every=${GPU_TRAIN_EVAL_EVERY:-2000}
    flags=(--config=configs/eas.py:knee --workdir="$RUN" "--config.data.phantom_num=${GPU_TRAIN_PHANTOMS:-96}"
           "--config.train.num_steps=${GPU_TRAIN_STEPS:-12000}" "--config.train.batch_size=${GPU_TRAIN_BATCH:-16}"
           "--config.optim.lr=${GPU_TRAIN_LR:-0.005}" --config.train.init_weights=easunet_jax/weights/eas_knee.npz
           "--config.data.phantom_oa_fraction=${GPU_TRAIN_OA:-0.5}"
           "--config.data.phantom_elastic_mm=${GPU_TRAIN_ELASTIC_MM:-4.0}"
           "--config.train.eval_every_steps=$every" "--config.checkpoint.every_steps=$every"
           --config.log.every_steps=100 "$@")
    set +e
    PYTHONUNBUFFERED=1 timeout -s TERM -k 60 "${GPU_TRAIN_S:-360}" python3 main.py "${flags[@]}" 2>&1 \
      | tee "$OUT/train.log"
    set -e
    # First: a run stopped before its first checkpoint has no model to export, but its log rows.
    cp "$RUN/metrics.jsonl" "$OUT/" 2>/dev/null || echo 'gpu_train: no metrics.jsonl (stopped before step 1)'
    python3 main.py "${flags[@]}" --mode=export --config.eval.checkpoint=latest --output="$OUT/eas_knee.npz" \
      2>&1 | tail -n 3
    ;;
  *)
    echo "usage: bash bench/gpu_train.sh wheels | train [--config.<field>=<value> ...]" >&2
    exit 2
    ;;
esac
