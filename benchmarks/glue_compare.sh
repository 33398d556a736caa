#!/usr/bin/env bash
# Every method on real GLUE tasks at one budget, through `diffprune compare`.
#   bash benchmarks/glue_compare.sh [GLUE_DIR] [OUT_DIR] [TASKS...]
# Budget, methods (compare_methods) and any per-method options (method_options) come from
# benchmarks/recipe.json; EPOCHS, METHODS and TASKS override it. Finished runs are reused and interrupted
# ones resumed, so re-running continues where it stopped.
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/compare}
shift 2 2>/dev/null || true
PY=${PY:-.venv/bin/python}
R="$PY benchmarks/recipe.py"
TASKS=${*:-$($R get tasks)}
EPOCHS=${EPOCHS:-$($R get epochs)}
METHODS=${METHODS:-$($R get compare_methods | tr ' ' ,)}
for task in $TASKS; do
  $PY -m diffprune compare --task "$task" --data-dir "$GLUE" --output-dir "$OUT/$task" $($R common $task) \
    --methods "$METHODS" --epochs "$EPOCHS" --seed "$($R get seed)" $($R sets "$METHODS")
done
