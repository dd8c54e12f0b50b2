#!/bin/bash
# Issue 19's default-run search (docs/recipe_sweep.md): the default run (`python -m sgtrain`, sparse, the digits
# shards) with the given overrides on one thread, a checkpoint every 200 G steps kept, then every checkpoint from
# step FROM (default 1200) scored by the digit classifier, so one run gives precision and recall along its length.
# Figures go to $SWEEP_DIR/trajectory.jsonl (default runs/recipe_sweep), one line per checkpoint.
#   benchmarks/recipe_trajectory.sh shared16 --model.shared_dim=16 --train.steps=3000 --train.ema_start=800
set -euo pipefail
name=$1
shift
cd "$(dirname "$0")/.."
out=${SWEEP_DIR:-runs/recipe_sweep}
from=${FROM:-1200}
mkdir -p "$out"
run=$out/$name
rm -rf "$run"
start=$(date +%s)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m sgtrain --train.eval_every=0 --train.checkpoint_every=200 \
    --train.keep_checkpoints=30 --run_dir="$run" "$@" > "$run.log" 2>&1
end=$(date +%s)
for ckpt in "$run"/checkpoints/step-*.pt; do
    [ -f "$ckpt" ] || continue
    step=$(basename "$ckpt" .pt); step=$((10#${step#step-}))
    [ "$step" -ge "$from" ] || continue
    OMP_NUM_THREADS=1 .venv/bin/python -m sgtrain evaluate "$ckpt" --metrics fid,is,pr,classes --num-samples 1000 \
        --extractor classifier --json > "$run.eval.json" 2>> "$run.log"
    printf '{"name": "%s", "step": %d, "train_s": %d, "args": "%s", "eval": %s}\n' "$name" "$step" \
        $((end - start)) "$*" "$(tr -d '\n' < "$run.eval.json")" >> "$out/trajectory.jsonl"
done
