"""`diffprune report`: the Diff Pruning paper's tables and figures, and a verdict on each of its claims,
from finished runs.

    diffprune report OUT/ [MORE_RUNS/ …] --output OUT/report

Runs are found by `collect.find_runs` (run directories, or folders holding them at any depth, such as a
`compare` or `sweep` output); `tables` computes each section's numbers, `claims` the verdicts, `figures` the
PNGs and `markdown` report.md. Everything computed also goes to report.json.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text
from .claims import check_claims
from .collect import Run, find_runs, settings_summary
from .tables import build_tables

__all__ = ["build_report", "Run", "find_runs"]


def build_report(paths: list[str | os.PathLike], output: str | os.PathLike) -> dict:
    """Write OUTPUT/report.md, report.json and the PNGs; returns report.json's content."""
    from . import figures, markdown

    runs, notes = find_runs(paths)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs)
    claims = check_claims(tables)
    pngs: dict[str, str] = {}
    for key, name, draw in (("heatmap", "nnz_heatmap.png", figures.plot_heatmap),
                            ("sparsity", "sparsity.png", figures.plot_sparsity),
                            ("curves", "training_curves.png", figures.plot_curves)):
        if tables[key] is not None:
            draw(tables[key], out / name)
            pngs[key] = name
    caps = sorted({(r.task, r.run_config["max_train_samples"]) for r in (*runs, *(p for r in runs for p in r.peers))
                   if r.run_config.get("max_train_samples")})
    info = {"num_runs": len(runs), "tasks": sorted({r.task for r in runs}),
            "methods": sorted({r.name for r in runs}),
            "main_metrics": {r.task: r.metrics.get("main_metric", "main") for r in sorted(runs, key=lambda r: r.task)},
            "settings": settings_summary(runs), "capped": ", ".join(f"{t}: {n}" for t, n in caps),
            "one_seed": not any(r.peers for r in runs), "notes": notes,
            "runs": [{"path": str(r.path), "task": r.task, "name": r.name, "dev_main": r.dev_main} for r in runs]}
    atomic_write_text(out / "report.md", markdown.render(info, tables, claims, pngs))
    result = {"info": info, "claims": claims, "tables": tables, "figures": pngs}
    atomic_write_json(out / "report.json", result)
    return result
