"""`diffprune compare`: several methods at one budget, table/CSV/plot, finished runs reused, clear errors."""
import csv
import json

import pytest

from diffprune.cli import main
from diffprune.compare import parse_entries
from diffprune.errors import DiffpruneError
from diffprune.tasks import write_demo_data


def compare_args(model_dir, data_dir, out, methods, *extra):
    return ["compare", "--model", str(model_dir), "--task", "toy", "--train-file", str(data_dir / "train.tsv"),
            "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence", "--output-dir", str(out),
            "--methods", methods, "--max-train-samples", "32", "--max-eval-samples", "24", "--batch-size", "16",
            "--max-length", "16", "--epochs", "2", *extra]


def test_budget_is_split_over_phases_and_set_targets_one_method():
    entries = parse_entries(["full", "diff-pruning-structured", "lt-sft"], ["lr=1e-3", "full.lr=2e-4"], 4.0)
    full, dp, lt = entries
    assert full.options == {"epochs": 4.0, "lr": 2e-4}
    assert dp.method == "diff-pruning" and dp.options["structured"] is True
    assert dp.options["l0_epochs"] + dp.options["epochs"] == 4.0 and dp.options["lr"] == 1e-3
    assert lt.options["finetune_epochs"] + lt.options["epochs"] == 4.0


def test_unknown_method_and_bad_set_are_clear_errors():
    with pytest.raises(DiffpruneError, match="did you mean"):
        parse_entries(["bitfitt"], [], 1.0)
    with pytest.raises(DiffpruneError, match="not one of the compared"):
        parse_entries(["full"], ["lora.rank=4"], 1.0)


def test_compare_runs_collects_and_reuses(tmp_path, tiny_model_dir, capsys):
    data_dir = write_demo_data(tmp_path / "demo")
    out = tmp_path / "cmp"
    args = compare_args(tiny_model_dir, data_dir, out, "full,bitfit,diff-pruning", "--set", "sparsity=0.02",
                        "--set", "bitfit.lr=1e-3")
    assert main(args) == 1  # sparsity is not an option of full finetuning: that run fails …
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["status"] for r in rows] == ["failed", "failed", "ok"]  # … and so does bitfit; DP still runs
    assert "unknown option" in (out / "runs" / "full.log").read_text()

    # the per-method form works, and the finished diff-pruning run is reused, not retrained
    dp_metrics = (out / "runs" / "diff-pruning" / "metrics.json").read_text()
    args = compare_args(tiny_model_dir, data_dir, out, "full,bitfit,diff-pruning", "--set",
                        "diff-pruning.sparsity=0.02", "--set", "bitfit.lr=1e-3")
    assert not (out / "runs" / "full").exists()  # a config error leaves no half-made run behind
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "diff-pruning: finished earlier, reused" in printed
    assert (out / "runs" / "diff-pruning" / "metrics.json").read_text() == dp_metrics
    rows = {r["method"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    assert all(r["status"] == "ok" for r in rows.values())
    for name, row in rows.items():  # the table is what the runs recorded
        m = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert int(row["stored_bytes"]) == m["storage"]["stored_bytes"]
        assert float(row["dev_accuracy"]) == pytest.approx(m["final"]["dev"]["accuracy"])
    assert float(rows["full"]["time_vs_full"]) == pytest.approx(1.0)
    # parameters per task: full stores every parameter, DP 2% of d plus the head
    full_m = json.loads((out / "runs" / "full" / "metrics.json").read_text())["storage"]
    assert int(rows["full"]["task_params"]) == full_m["dense_params"]
    assert float(rows["diff-pruning"]["task_params_pct"]) < 10 < float(rows["full"]["task_params_pct"])
    md = (out / "comparison.md").read_text()
    assert "| bitfit |" in md and "stored bytes" in md
    assert (out / "comparison.png").stat().st_size > 1000
