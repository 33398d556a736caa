#!/usr/bin/env bash
# Every method on real GLUE tasks with MiniLM at one budget, through `diffprune compare`.
#   bash benchmarks/glue_compare.sh [GLUE_DIR] [OUT_DIR] [TASKS...]
# Budget: EPOCHS (default 3) total epochs per method (two-phase methods split them evenly), batch 32,
# max length 128, seed 42, training sets capped at MAX_TRAIN (default 1000, a seeded random subset: 2 CPU
# cores), full dev sets. Learning rates: each method's default except where set below (dense phases at
# 1e-4 as in full finetuning, sparse fixed-mask phases at 5e-4, adapters at 5e-4; Diff Pruning's λ warms up
# over the first half of its L0 phase, without which the gates close before w learns on budgets this short).
# Finished runs are reused and interrupted ones resumed, so re-running continues where it stopped.
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/compare}
shift 2 2>/dev/null || true
TASKS=${*:-rte mrpc}
PY=${PY:-.venv/bin/python}
MAX_TRAIN=${MAX_TRAIN:-1000}
EPOCHS=${EPOCHS:-3}
METHODS=${METHODS:-full,diff-pruning-structured,diff-pruning,bitfit,lora,prune-lora,adapter-houlsby,adapter-pfeiffer,non-adaptive-diff-pruning,lt-sft,last-layer}
# per-method options (only those of the methods being compared are passed on)
declare -A OPTS=(
  [full]="lr=1e-4" [last-layer]="lr=1e-4"
  [adapter-houlsby]="lr=5e-4" [adapter-pfeiffer]="lr=5e-4"
  [non-adaptive-diff-pruning]="lr=1e-4 fixed_lr=5e-4" [lt-sft]="lr=1e-4 fixed_lr=5e-4"
  [diff-pruning]="lr=1e-4 fixed_lr=5e-4 l0_warmup=0.5"
  [diff-pruning-structured]="lr=1e-4 fixed_lr=5e-4 l0_warmup=0.5"
)
SETS=()
for m in ${METHODS//,/ }; do
  for kv in ${OPTS[$m]:-}; do SETS+=(--set "$m.$kv"); done
done
for task in $TASKS; do
  $PY -m diffprune compare --model minilm --task "$task" --data-dir "$GLUE" --output-dir "$OUT/$task" \
    --methods "$METHODS" --epochs "$EPOCHS" --max-train-samples "$MAX_TRAIN" --batch-size 32 --max-length 128 \
    --seed 42 "${SETS[@]}"
done
