#!/usr/bin/env bash
# The Diff Pruning paper's sparsity sweep on the five shared GLUE tasks with MiniLM, then its report.
#   bash benchmarks/sweep_glue.sh [GLUE_DIR] [OUT_DIR]
# Grid per task: full finetuning once; Diff Pruning and structured Diff Pruning at 0.1%, 0.25%, 0.5% and 1%
# (SPARSITIES) = 9 runs, 45 over sst2 cola mrpc stsb rte (TASKS). Results: OUT/<task>/comparison.md as each run
# lands, OUT/report/report.md (+ PNGs, report.json) rebuilt after each task: `diffprune report OUT --output R`
# rebuilds it at any time.
#
# SIZED FOR 2 CPU CORES, NOT THE PAPER'S BUDGET: training sets are capped at MAX_TRAIN (default 800, a seeded
# random subset of each task) and each run gets EPOCHS (default 3) epochs in total, split evenly between Diff
# Pruning's L0 and fixed-mask phases (the paper: 3 + 3 to 5 epochs on full GLUE, BERT-large). Dev sets are full.
# Batch 32, max length 128, seed 42; learning rates and the L0 warm-up as in glue_compare.sh (dense phases 1e-4,
# fixed-mask 5e-4, l0_warmup 0.5: without it the penalty closes the gates before w learns on this short budget).
# That is 75 steps per run; measured MiniLM step times on 2 free cores (RTE/MRPC, the longest sequences):
# ~4.4 s in the L0 phase, ~2 s fixed-mask, ~2.7 s full finetuning, so about 40 min for each of those tasks and
# less for the short-sentence ones: roughly 2-3 hours in all. The cap is stated in the report's header too.
# Finished runs are reused and interrupted ones resumed, so re-running continues where it stopped.
set -u
GLUE=${1:-../shared/data/glue}
OUT=${2:-benchmarks/out/sweep}
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-sst2,cola,mrpc,stsb,rte}
METHODS=${METHODS:-full,diff-pruning,diff-pruning-structured}
SPARSITIES=${SPARSITIES:-0.001,0.0025,0.005,0.01}
MAX_TRAIN=${MAX_TRAIN:-800}
EPOCHS=${EPOCHS:-3}
$PY -m diffprune sweep --model minilm --tasks "$TASKS" --data-dir "$GLUE" --output-dir "$OUT" \
  --methods "$METHODS" --sparsities "$SPARSITIES" --epochs "$EPOCHS" --max-train-samples "$MAX_TRAIN" \
  --batch-size 32 --max-length 128 --seed 42 \
  --set full.lr=1e-4 \
  --set diff-pruning.lr=1e-4 --set diff-pruning.fixed_lr=5e-4 --set diff-pruning.l0_warmup=0.5 \
  --set diff-pruning-structured.lr=1e-4 --set diff-pruning-structured.fixed_lr=5e-4 \
  --set diff-pruning-structured.l0_warmup=0.5
