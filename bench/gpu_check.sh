#!/usr/bin/env bash
# The project's GPU check, on one GPU, in about 8 minutes: prints one Markdown table of
#   - the training step's compile time, cold (empty cache) and cached, in float32 and bfloat16;
#   - training and inference slices/s of configs/eas.py (batch 16, 384 x 384), float32 and bfloat16;
#   - the PyTorch reference on the same GPU (eager bf16 channels_last, and torch.compile), when torch and
#     its script are there ($TORCH_BENCH, default ../shared/bench/torch_bench_gpu.py);
#   - main.py end to end for 200 steps on a full-size phantom, its steps/s against the bare step's.
#
#   bash bench/gpu_check.sh            # from the repository root; results and logs in $GPU_CHECK_DIR
#
# Needs the project's requirements with a CUDA jax (README, "GPUs"). Each run has its own time limit
# (GPU_CHECK_LIMIT_S, default 200 s): a run that fails or outlasts it shows as such in its row, and the
# check goes on. Any other flag is passed to every run of ours (e.g. --config.model.depthwise_impl=pallas).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXX)}
LIMIT=${GPU_CHECK_LIMIT_S:-200}
TORCH_BENCH=${TORCH_BENCH:-../shared/bench/torch_bench_gpu.py}
PY=${PYTHON:-python3}
STEP_TIME=(bench/step_time.py --config=configs/eas.py --batch=16 --size=384 --steps=20 --warmup=5)
mkdir -p "$DIR"
echo "gpu_check: results and logs in $DIR" >&2
start=$SECONDS

run() {  # run NAME COMMAND...: the command's output in $DIR/NAME.log, its last line in $DIR/NAME.json
  local name=$1; shift
  echo "gpu_check: $name ($((SECONDS - start)) s so far)" >&2
  timeout "$LIMIT" "$@" >"$DIR/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$DIR/$name.log" >"$DIR/$name.json"
  [ $rc -eq 0 ] || echo "{\"failed\": $rc}" >"$DIR/$name.json"
}

for dtype in float32 bfloat16; do
  rm -rf "$DIR/cache_$dtype"  # cold: an empty compilation cache; cached: the same cache again
  for pass in cold cached; do
    run "train_${dtype}_$pass" "$PY" "${STEP_TIME[@]}" --step=train --config.model.dtype=$dtype \
      --cache_dir="$DIR/cache_$dtype" "$@"
  done
  run "infer_$dtype" "$PY" "${STEP_TIME[@]}" --step=inference --config.model.dtype=$dtype \
    --cache_dir="$DIR/cache_$dtype" "$@"
done

if [ -f "$TORCH_BENCH" ] && "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  run torch_eager "$PY" "$TORCH_BENCH" --batch 16 --size 384 --dtype bfloat16 --channels-last
  run torch_compile "$PY" "$TORCH_BENCH" --batch 16 --size 384 --dtype bfloat16 --channels-last --compile
else
  for name in torch_eager torch_compile; do echo '{"skipped": 1}' >"$DIR/$name.json"; done
fi

# End to end: phantom generation, slice store, training with validation at the end, the float32 step
# loaded from the cache the check above filled.
rm -rf "$DIR/main"
JAX_COMPILATION_CACHE_DIR="$DIR/cache_float32" run main "$PY" main.py --config=configs/eas.py \
  --workdir="$DIR/main/run" --config.data.phantom_num=4 --config.train.num_steps=200 \
  --config.log.every_steps=25 "$@"

"$PY" - "$DIR" "$((SECONDS - start))" <<'EOF'
import json, pathlib, statistics, sys

d, wall = pathlib.Path(sys.argv[1]), sys.argv[2]
get = lambda name: json.loads((d / f'{name}.json').read_text() or '{}')

def cell(name, key, unit=''):
  r = get(name)
  if 'failed' in r: return f"failed (exit {r['failed']}; {name}.log)"
  if 'skipped' in r: return 'skipped: no CUDA torch or no torch_bench_gpu.py'
  return f'{r[key]}{unit}' if key in r else f'? ({name}.log)'

# The PyTorch script's keys: train_slices_per_s, infer_slices_per_s and first_step_s.
rows = [('what', 'float32', 'bfloat16')]
rows.append(('train step compile, cold', *(cell(f'train_{t}_cold', 'compile_s', ' s') for t in ('float32', 'bfloat16'))))
rows.append(('train step compile, cached', *(cell(f'train_{t}_cached', 'compile_s', ' s') for t in ('float32', 'bfloat16'))))
rows.append(('train slices/s', *(cell(f'train_{t}_cached', 'train_slices_per_s') for t in ('float32', 'bfloat16'))))
rows.append(('inference slices/s', *(cell(f'infer_{t}', 'infer_slices_per_s') for t in ('float32', 'bfloat16'))))
for name, what in (('torch_eager', 'PyTorch eager, bf16 autocast, channels_last'),
                   ('torch_compile', 'PyTorch torch.compile, bf16 autocast, channels_last')):
  rows.append((f'{what}: train / inference slices/s', '',
               f"{cell(name, 'train_slices_per_s')} / {cell(name, 'infer_slices_per_s')}"))
best = lambda names, key: max((get(n).get(key, 0) for n in names), default=0)  # the faster dtype
reference = get('torch_compile')
if 'train_slices_per_s' in reference:
  train = best(('train_float32_cached', 'train_bfloat16_cached'), 'train_slices_per_s')
  infer = best(('infer_float32', 'infer_bfloat16'), 'infer_slices_per_s')
  rows.append(('ours (the faster dtype) / torch.compile: train, inference',
               f"{train / reference['train_slices_per_s']:.2f}x", f"{infer / reference['infer_slices_per_s']:.2f}x"))
# main.py: the logged steps/s of each 25-step period, the first (compilation) left out.
metrics = d / 'main' / 'run' / 'metrics.jsonl'
rates = [r['train/steps_per_s'] for r in map(json.loads, metrics.open()) if 'train/steps_per_s' in r][1:] \
    if metrics.exists() else []
bare = get('train_float32_cached').get('train_step_ms_median')
if rates and bare:
  e2e = statistics.median(rates)
  rows.append(('main.py end to end, 200 steps: steps/s (bare step)', f'{e2e:.2f} ({1e3 / bare:.2f}); '
               f'{e2e * bare / 1e3:.1%} of the bare step', ''))
else:
  rows.append(('main.py end to end, 200 steps', 'failed or no rates (main.log)', ''))
first = get('train_float32_cold')
print(f"\nGPU check on {first.get('device', '?')} (jax {first.get('jax', '?')}, flax {first.get('flax', '?')}), "
      f'batch 16, 384 x 384, configs/eas.py; {wall} s in all; logs in {d}\n')
for i, row in enumerate(rows):
  print('| ' + ' | '.join(row) + ' |')
  if i == 0:
    print('|---|---:|---:|')
EOF
