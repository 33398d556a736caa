"""benchmarks/grid.py's `--keep`: rows of an earlier grid stand in for cells whose run folders are gone, except
where a pending sparsity-curve cell needs the kept cell's L0 state."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffprune.train.rundir import LOCK_NAME

GRID = Path(__file__).resolve().parent.parent / "benchmarks" / "grid.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("bench_grid", GRID)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


RECIPE = {"model": "minilm", "batch_size": 8, "max_length": 32, "epochs": 2, "seed": 1, "tasks": ["rte", "mrpc"],
          "sparsity": 0.005, "grid_methods": ["full", "diff-pruning-structured"],
          "curve": {"method": "diff-pruning-structured", "sparsities": [0.01]}, "method_options": {}}


def row(task, seed, label, main):
    return {"task": task, "seed": seed, "label": label, "main_metric": "accuracy", "dev": {"main": main},
            "after_first_phase": None, "nonzero_before_projection": None, "stored_bytes": 1, "minutes": 1.0,
            "steps": 10}


def test_kept_rows_count_as_done_but_a_needed_l0_source_runs_again(grid, tmp_path):
    todo = grid.cells(RECIPE, tmp_path / "out", None)
    labels = {(c.task, c.label) for c in todo}
    assert ("rte", "diff-pruning-structured@0.01") in labels  # the curve cell
    old = [row("rte", 1, "full", 0.6), row("rte", 1, "diff-pruning-structured@0.005", 0.55),
           row("mrpc", 1, "full", 0.8)]
    (tmp_path / "old.json").write_text(json.dumps(old))
    grid.keep_rows(todo, [str(tmp_path / "old.json")])
    by = {(c.task, c.label): c for c in todo}
    assert by["rte", "full"].kept["dev"]["main"] == 0.6
    assert by["mrpc", "full"].kept["dev"]["main"] == 0.8
    # the rte curve cell is pending and needs the structured cell's L0 state, which a row cannot give
    assert by["rte", "diff-pruning-structured@0.005"].kept is None
    assert by["mrpc", "diff-pruning-structured@0.005"].kept is None  # never in the old grid
    assert grid.summary(by["rte", "full"]) == old[0]
    assert grid.summary(by["mrpc", "diff-pruning-structured@0.005"]) is None


def test_kept_curve_cell_frees_its_source(grid, tmp_path):
    todo = grid.cells(RECIPE, tmp_path / "out", {"rte"})
    old = [row("rte", 1, "diff-pruning-structured@0.005", 0.55), row("rte", 1, "diff-pruning-structured@0.01", 0.5)]
    (tmp_path / "old.json").write_text(json.dumps(old))
    grid.keep_rows(todo, [str(tmp_path / "old.json")])
    by = {c.label: c for c in todo}
    assert by["diff-pruning-structured@0.005"].kept == old[0]
    assert by["diff-pruning-structured@0.01"].kept == old[1]
    assert by["full"].kept is None


def test_later_keep_file_wins(grid, tmp_path):
    todo = grid.cells(RECIPE, tmp_path / "out", {"mrpc"})
    for name, value in (("a.json", 0.1), ("b.json", 0.2)):
        (tmp_path / name).write_text(json.dumps([row("mrpc", 1, "full", value)]))
    grid.keep_rows(todo, [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert next(c for c in todo if c.label == "full").kept["dev"]["main"] == 0.2


@pytest.mark.parametrize("content", ['{"rows": []}', "not json", '[{"task": "rte"}]'])
def test_bad_keep_file_is_one_error_line_and_nothing_made(tmp_path, content):
    (tmp_path / "old.json").write_text(content)
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(GRID), "--recipe", str(tmp_path / "recipe.json"), "--out", str(out),
                        "--keep", str(tmp_path / "old.json"), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("grid.py: error: --keep:")
    assert "Traceback" not in r.stderr
    assert not out.exists()


def fake_finished_run(run_dir: Path, main: float) -> None:
    (run_dir / "diff").mkdir(parents=True)
    (run_dir / "phases" / "l0" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (run_dir / "phases" / "l0" / "l0_state").mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"task": "rte", "main_metric": "accuracy",
                                                      "phases": {"full": {"train": {"seconds": 6, "steps": 3}}},
                                                      "final": {"full": {"main": main}}}))
    (run_dir / "run_config.json").write_text("{}")
    (run_dir / "log.jsonl").write_text('{"loss": 0.7, "step": 1}\n')
    (run_dir / "diff" / "diff_config.json").write_text("{}")
    (run_dir / "diff" / "small.safetensors").write_bytes(b"x" * 100)
    (run_dir / "diff" / "big.safetensors").write_bytes(b"x" * 5000)
    (run_dir / "phases" / "l0" / "checkpoints" / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (run_dir / "phases" / "l0" / "l0_state" / "gates.safetensors").write_bytes(b"x")
    (run_dir / LOCK_NAME).write_text("1")


def test_archive_keeps_what_the_report_reads_and_nothing_heavy(grid, tmp_path, monkeypatch):
    from diffprune.report.collect import find_runs

    monkeypatch.setattr(grid, "ARCHIVE_MAX_BYTES", 1000)
    out, dest = tmp_path / "out", tmp_path / "archive"
    todo = grid.cells(RECIPE, out, {"rte"})
    finished = next(c for c in todo if c.label == "full")
    fake_finished_run(finished.run_dir, 0.61)
    unfinished = next(c for c in todo if c.label != "full")
    unfinished.run_dir.mkdir(parents=True)
    (unfinished.run_dir / "run_config.json").write_text("{}")
    assert grid.archive(todo, out, dest) == 1
    copy = dest / "rte" / "s1" / "full"
    kept = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert kept == ["diff/diff_config.json", "diff/small.safetensors", "log.jsonl", "metrics.json",
                    "run_config.json"]
    assert not (dest / "rte" / "s1" / unfinished.label).exists()
    assert [p.name for p in (dest / "rte" / "s1").iterdir()] == ["full"]  # no temporary folder left behind
    runs, _ = find_runs([dest])
    assert [r.dev_main for r in runs] == [0.61]
    assert grid.archive(todo, out, dest) == 0  # already there: not copied twice


def test_seed_means_table(grid):
    """Two seeds of two runs on three tasks (the second seed lacks one task): means and spreads over the
    tasks both seeds finished, computed here by hand."""
    rows = [row("rte", 1, "full", 0.60), row("mrpc", 1, "full", 0.80), row("cola", 1, "full", 0.20),
            row("rte", 1, "dp", 0.50), row("mrpc", 1, "dp", 0.70), row("cola", 1, "dp", 0.10),
            row("rte", 2, "full", 0.64), row("mrpc", 2, "full", 0.78),
            row("rte", 2, "dp", 0.56), row("mrpc", 2, "dp", 0.74)]
    text = grid.table(rows, RECIPE)
    tail = text[text.index("Mean over seeds 1, 2"):].splitlines()
    assert tail[2] == "| run | rte | mrpc | average |"
    # full: rte (60+64)/2 = 62.0, spread 4.0; mrpc 79.0, spread 2.0; average 70.5
    assert tail[4] == "| full | 62.0 (4.0) | 79.0 (2.0) | 70.5 |"
    # dp: rte 53.0 (6.0), mrpc 72.0 (4.0); average 62.5
    assert tail[5] == "| dp | 53.0 (6.0) | 72.0 (4.0) | 62.5 |"
    assert "Mean over seeds" not in grid.table([r for r in rows if r["seed"] == 1], RECIPE)
