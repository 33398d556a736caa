#!/usr/bin/env bash
# The Diff Pruning paper's sparsity sweep on the shared GLUE tasks, then its report.
#   bash benchmarks/sweep_glue.sh [GLUE_DIR] [OUT_DIR]
# Grid per task: full finetuning once; Diff Pruning and structured Diff Pruning at each of SPARSITIES
# (default: the recipe's curve plus its sparsity). Budget, caps, seed and per-method options come from
# benchmarks/recipe.json; TASKS (space-separated), METHODS, SPARSITIES and EPOCHS override it. `diffprune
# sweep` trains the L0 phase once per task and variant and projects it to every sparsity. Results:
# OUT/<task>/comparison.md as each run lands, OUT/report/report.md rebuilt after each task. Resumable.
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/sweep}
PY=${PY:-.venv/bin/python}
R="$PY benchmarks/recipe.py"
TASKS=${TASKS:-$($R get tasks)}
METHODS=${METHODS:-full,diff-pruning,diff-pruning-structured}
SPARSITIES=${SPARSITIES:-$($R get sweep_sparsities | tr ' ' ,)}
EPOCHS=${EPOCHS:-$($R get epochs)}
for task in $TASKS; do  # one task per call: each task has its own training-set cap
  $PY -m diffprune sweep --tasks "$task" --data-dir "$GLUE" --output-dir "$OUT" $($R common $task) \
    --methods "$METHODS" --sparsities "$SPARSITIES" --epochs "$EPOCHS" --seed "$($R get seed)" $($R sets "$METHODS")
done
