#!/bin/bash
# One point of issue 19's recipe sweep (docs/recipe_sweep.md): a dense run of digits.yaml with the given overrides,
# on the in-memory digits and one thread (two points run side by side on a 2-core machine), then scored by the
# digit classifier; its figures are appended to $SWEEP_DIR/results.jsonl (default runs/recipe_sweep).
#   benchmarks/recipe_sweep_one.sh ch4_lr5e4 --model.g_ch=4 --model.d_ch=4 --train.steps=1500 \
#       --train.ema_start=750 --train.g_lr=5e-4 --train.d_lr=5e-4
set -euo pipefail
name=$1
shift
cd "$(dirname "$0")/.."
out=${SWEEP_DIR:-runs/recipe_sweep}
mkdir -p "$out"
run=$out/$name
rm -rf "$run"
start=$(date +%s)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m sgtrain --data.shards=null --sparse.method=dense \
    --sparse.density_g=1 --sparse.density_d=1 --train.eval_every=0 --run_dir="$run" "$@" > "$run.log" 2>&1
end=$(date +%s)
OMP_NUM_THREADS=1 .venv/bin/python -m sgtrain evaluate "$run" --metrics fid,is,pr,classes --num-samples 1000 \
    --extractor classifier --json > "$run.eval.json" 2>> "$run.log"
printf '{"name": "%s", "train_s": %d, "args": "%s", "eval": %s}\n' "$name" $((end - start)) "$*" \
    "$(tr -d '\n' < "$run.eval.json")" >> "$out/results.jsonl"
