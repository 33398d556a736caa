"""benchmarks/gate_timing.py: the label prior's loss, the step a loss leaves it, and a real run's row."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.run_inputs import data_dir, trained  # noqa: F401  (fixtures)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gate_timing.py"


@pytest.fixture(scope="module")
def gt():
    spec = importlib.util.spec_from_file_location("bench_gate_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prior_loss_is_label_entropy_or_variance(gt):
    assert gt.prior_loss([0, 0, 0, 1], regression=False) == pytest.approx(-(0.75 * math.log(0.75) +
                                                                             0.25 * math.log(0.25)))
    assert gt.prior_loss([0, 2, 2], regression=False) == pytest.approx(-(math.log(1 / 3) / 3 +
                                                                         2 / 3 * math.log(2 / 3)))
    assert gt.prior_loss([1.0, 2.0, 3.0], regression=True) == pytest.approx(2 / 3)


def test_learns_at_needs_the_window_mean_below_the_margin(gt):
    records = [{"step": s, "loss": v} for s, v in [(10, 1.0), (20, 0.5), (30, 1.0), (40, 0.8), (50, 0.8)]]
    assert gt.learns_at(records, 1.0, 0.05, 1) == 20
    assert gt.learns_at(records, 1.0, 0.05, 2) == 20   # (1.0 + 0.5) / 2 = 0.75
    assert gt.learns_at(records, 1.0, 0.05, 3) == 30   # (1.0 + 0.5 + 1.0) / 3 = 0.833 < 0.95
    assert gt.learns_at(records, 1.0, 0.2, 3) == 40    # 0.833 at 30 is not below 0.8; 0.767 at 40 is
    assert gt.learns_at(records, 1.0, 0.25, 3) is None  # 0.867 at 50


def test_row_of_a_real_l0_run(gt, trained, capsys):  # noqa: F811
    assert gt.main([str(trained.parent), "--window", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| toy")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    l0 = [r for r in records if r.get("phase") == "l0" and "loss" in r]
    assert cells[3] == "l0" and int(cells[4]) == l0[-1]["step"]
    half = next((r["step"] for r in l0 if r["expected_l0_frac"] < 0.5), None)
    assert cells[7] == (str(half) if half is not None else "never")
    assert 0.0 < float(cells[5]) <= math.log(2) + 1e-9  # a two-label task's prior
    prior = float(cells[5])
    assert float(cells[9]) == pytest.approx(l0[-1]["loss"] / prior, rel=1e-2)


def test_no_run_is_one_error_line(gt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gt.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gate_timing.py: error:") or "error:" in err[-1]
