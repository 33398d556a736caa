#!/usr/bin/env bash
# Structured Diff Pruning at the recipe's sparsity vs full finetuning, real GLUE dev sets, same budget.
#   bash benchmarks/glue_dp_vs_full.sh [GLUE_DIR] [OUT_DIR]
# Budget and settings from benchmarks/recipe.json (model, batch, length, epochs, training-set caps); every
# method runs with the library's defaults. EPOCHS, SEED and TASKS (space-separated) override the recipe;
# RUNS picks the methods (default both, one after the other; RUNS=full and RUNS=dp-structured in two
# processes share the cores). DP_EXTRA adds flags to the Diff Pruning run (e.g. DP_EXTRA="--l0-lambda
# 1.25e-7" for the paper's fixed λ). Each run is resumable (--resume) and its metrics land in
# OUT/<task>-<method>/metrics.json as it finishes; benchmarks/table.py turns them into the Markdown table.
# benchmarks/grid.py runs the whole grid of the recipe (four methods, five tasks, seeds, sparsity curve).
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/glue}
PY=${PY:-.venv/bin/python}
R="$PY benchmarks/recipe.py"
TASKS=${TASKS:-$($R get tasks)}
EPOCHS=${EPOCHS:-$($R get epochs)}
SEED=${SEED:-$($R get seed)}
SPARSITY=$($R get sparsity)
DP_EXTRA=${DP_EXTRA:-}
RUNS=${RUNS:-full dp-structured}
HALF=$($PY -c "print($EPOCHS / 2)")
mkdir -p "$OUT"
for task in $TASKS; do
  run() {  # name, then method flags
    local name=$1; shift
    case " $RUNS " in *" $name "*) ;; *) return ;; esac
    [ -f "$OUT/$task-$name/metrics.json" ] && { echo "skip $task-$name (done)"; return; }
    resume=""; [ -d "$OUT/$task-$name" ] && resume="--resume"
    $PY -m diffprune train --task $task --data-dir "$GLUE" --output-dir "$OUT/$task-$name" $($R common $task) \
      --seed $SEED --no-progress --logging-steps 20 $resume "$@" \
      > "$OUT/$task-$name.log" 2>&1 || echo "FAILED $task-$name (see $OUT/$task-$name.log)"
  }
  run full --method full --epochs $EPOCHS
  run dp-structured --method diff-pruning --structured --sparsity $SPARSITY --l0-epochs $HALF --epochs $HALF $DP_EXTRA
done
$PY benchmarks/table.py "$OUT"
