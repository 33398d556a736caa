"""When a Diff Pruning run's gates closed, against when its model started to learn.

The L0 phase's gates can only choose well from a model that has learnt something: while the training loss
sits at the label prior (the loss of predicting the label frequencies, or the mean for regression), the
task gradient on each gate is noise. This script reads finished runs' log.jsonl and prints, per run of the
first phase (L0 or dense finetuning):

* the label prior's loss on the run's own training set (same task, subset and seed as the run);
* `learns at`: the first logged step where the training loss, averaged over `--window` log records, is
  below (1 − margin) × prior;
* for L0 runs: the steps where E‖δ‖₀/d fell below 50% and reached 1.5 × the target, and the phase's last
  loss over the prior.

    python benchmarks/gate_timing.py benchmarks/results/grid/runs [--data-dir ../shared/data/glue]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffprune.report.collect import find_runs  # noqa: E402


def prior_loss(labels, regression: bool) -> float:
    """The training loss of a model that ignores its input: label variance (MSE) or label entropy (CE)."""
    import numpy as np

    y = np.asarray(labels, dtype=float)
    if regression:
        return float(y.var())
    p = np.bincount(y.astype(int)) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def learns_at(records: list[dict], prior: float, margin: float, window: int) -> int | None:
    """First step whose loss, averaged over the last `window` records, is below (1 − margin) · prior."""
    for i in range(window - 1, len(records)):
        if sum(r["loss"] for r in records[i - window + 1:i + 1]) / window < (1.0 - margin) * prior:
            return records[i]["step"]
    return None


def first_phase(run) -> tuple[str, list[dict]]:
    """The first phase's name and its training-loss records (`Run.log_records`: resumed steps once, cut lines skipped)."""
    records = [r for r in run.log_records() if "loss" in r and "step" in r]
    if not records:
        return "", []
    name = records[0].get("phase", "")
    return name, [r for r in records if r.get("phase", "") == name]


def run_prior(config: dict, data_dir: str | None, label_column: str, regression: bool) -> float:
    """The label prior's loss on the run's training set (same subset and seed), from its run_config.json.

    A registered task is rebuilt by name; a run on the user's own files (run_config's data_files) by
    those files, with `label_column` / `regression` as given here, since run_config does not record them.
    """
    from diffprune.errors import DiffpruneError
    from diffprune.tasks import custom_task, get_task, load_task_data

    files = config.get("data_files") if isinstance(config.get("data_files"), dict) else {}
    try:
        spec = get_task(config.get("task") or "")
    except DiffpruneError as e:
        spec, unknown = None, e
    if spec is None or files.get("train", spec.train_file) != spec.train_file:  # the user's own files
        if "train" not in files:
            raise DiffpruneError(f"{config.get('output_dir')}: {unknown}")
        evals = {k: v for k, v in files.items() if k != "train"}  # only labels are read: text columns do not matter
        spec = custom_task(files["train"], evals or files["train"], [label_column], label_column,
                           regression=regression, name=config.get("task") or "custom")
    data = load_task_data(spec, data_dir or config.get("data_dir"), config.get("max_train_samples"),
                          seed=config.get("seed", 0))
    return prior_loss(data.train["label"], spec.is_regression)


def row(run, args, priors: dict) -> dict | None:
    phase, records = first_phase(run)
    if not records or phase == "fixed_mask":  # a run that reused another run's L0 phase has none of its own
        return None
    config = run.run_config
    margin, window = args.margin, args.window
    key = json.dumps([config.get(k) for k in ("task", "data_files", "data_dir", "max_train_samples", "seed")])
    if key not in priors:
        priors[key] = run_prior(config, args.data_dir, args.label_column, args.regression)
    prior = priors[key]
    out = {"task": config.get("task"), "seed": config.get("seed"), "run": run.path.name, "phase": phase,
           "last_step": records[-1]["step"], "prior": prior, "learns_at": learns_at(records, prior, margin, window)}
    if "expected_l0_frac" in records[0]:
        target = float(run.sparsity or 0.0)
        out["density_half_at"] = next((r["step"] for r in records if r["expected_l0_frac"] < 0.5), None)
        out["density_target_at"] = next((r["step"] for r in records if r["expected_l0_frac"] <= 1.5 * target),
                                        None)
        tail = records[-window:]
        out["end_loss_over_prior"] = sum(r["loss"] for r in tail) / len(tail) / prior
    return out


def table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "never"
        return f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else str(v)

    cols = ["task", "seed", "run", "phase", "last_step", "prior", "learns_at", "density_half_at",
            "density_target_at", "end_loss_over_prior"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if c not in r else cell(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders, or folders holding runs at any depth")
    p.add_argument("--data-dir", help="where the runs' data is now (default: each run's own data_dir)")
    p.add_argument("--margin", type=float, default=0.05, help="share below the prior that counts as learnt")
    p.add_argument("--window", type=int, default=3, help="log records averaged")
    p.add_argument("--label-column", default="label", help="label column of runs on your own files")
    p.add_argument("--regression", action="store_true", help="runs on your own files are regression tasks")
    args = p.parse_args(argv)
    if not 0.0 < args.margin < 1.0 or args.window < 1:
        p.error("--margin must be in (0, 1) and --window at least 1")
    from diffprune.errors import DiffpruneError

    priors: dict = {}
    try:
        runs, _ = find_runs(args.runs)
        every = [r for run in runs for r in (run, *run.peers)]  # find_runs groups the seeds of one setting
        rows = [r for r in (row(run, args, priors) for run in every) if r]
    except DiffpruneError as e:  # a user's path or data: one line, no traceback
        p.error(str(e))
    if not rows:
        p.error("no finished run with a log.jsonl under " + ", ".join(args.runs))
    print(table(sorted(rows, key=lambda r: (str(r["task"]), str(r["seed"]), r["run"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
