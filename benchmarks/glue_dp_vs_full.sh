#!/usr/bin/env bash
# Structured Diff Pruning at 0.5% vs full finetuning, MiniLM, real GLUE dev sets, same budget.
#   bash benchmarks/glue_dp_vs_full.sh [GLUE_DIR] [OUT_DIR]
# Budget: 4 epochs per method (Diff Pruning: 2 L0 + 2 fixed-mask; full: 4), batch 32, max length 128,
# training sets capped at MAX_TRAIN (default 1500, a seeded random subset; 2 CPU cores) and full dev sets,
# on TASKS (default "mrpc rte"). Diff Pruning's λ warms up over the first half of its L0 phase, as in
# glue_compare.sh and sweep_glue.sh (without it the gates close before w learns on budgets this short).
# Each run is resumable (--resume) and its metrics land in OUT/<task>-<method>/metrics.json as it finishes;
# benchmarks/table.py turns them into the Markdown table.
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/glue}
PY=${PY:-.venv/bin/python}
MAX_TRAIN=${MAX_TRAIN:-1500}
TASKS=${TASKS:-mrpc rte}
mkdir -p "$OUT"
for task in $TASKS; do
  run() {  # name, then method flags
    local name=$1; shift
    [ -f "$OUT/$task-$name/metrics.json" ] && { echo "skip $task-$name (done)"; return; }
    resume=""; [ -d "$OUT/$task-$name" ] && resume="--resume"
    $PY -m diffprune train --model minilm --task $task --data-dir "$GLUE" --output-dir "$OUT/$task-$name" \
      --batch-size 32 --max-length 128 --seed 42 --max-train-samples $MAX_TRAIN --no-progress --logging-steps 20 $resume "$@" \
      > "$OUT/$task-$name.log" 2>&1 || echo "FAILED $task-$name (see $OUT/$task-$name.log)"
  }
  run full --method full --epochs 4 --lr 1e-4
  # dense-phase learning rate as for full finetuning; the sparse fixed-mask phase gets a higher one
  run dp-structured --method diff-pruning --structured --sparsity 0.005 --l0-epochs 2 --epochs 2 --lr 1e-4 \
    --set fixed_lr=5e-4 --set l0_warmup=0.5
done
$PY benchmarks/table.py "$OUT"
