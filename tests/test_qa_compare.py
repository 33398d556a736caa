"""`compare` and `report` on SQuAD-format QA runs: EM and F1 columns, F1 as the main metric."""
import csv
import json

import pytest

from diffprune.cli import main
from qa_data import write_squad


def test_compare_and_report_show_em_and_f1(tmp_path, tiny_model_dir, capsys):
    data = write_squad(tmp_path / "squad", n_train=3, n_dev=2, filler=2)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_model_dir), "--task", "squad", "--data-dir", str(data),
                 "--methods", "full,bitfit", "--epochs", "1", "--max-length", "48", "--doc-stride", "16",
                 "--batch-size", "8", "--max-eval-samples", "8", "--output-dir", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"full", "bitfit"}
    for method, row in rows.items():
        run = json.loads((out / "runs" / method / "metrics.json").read_text())
        assert run["main_metric"] == "f1"
        assert json.loads((out / "runs" / method / "run_config.json").read_text())["doc_stride"] == 16
        dev = run["final"]["dev"]
        assert float(row["dev_exact_match"]) == pytest.approx(dev["exact_match"])
        assert float(row["dev_f1"]) == pytest.approx(dev["f1"])
    assert "dev exact match" in (out / "comparison.md").read_text()

    report = tmp_path / "report"
    assert main(["report", str(out), "--output", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "squad: f1" in text
    table = text[text.index("**squad**"):]
    for method in ("full", "bitfit"):
        dev = json.loads((out / "runs" / method / "metrics.json").read_text())["final"]["dev"]
        assert f"| {method} | {100 * dev['exact_match']:.1f} | {100 * dev['f1']:.1f} |" in table
