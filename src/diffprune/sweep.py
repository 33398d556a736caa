"""`diffprune sweep`: methods × sparsities × tasks, trained through `compare` and summed up by `report`.

    diffprune sweep --tasks rte,mrpc --methods full,diff-pruning,diff-pruning-structured \
        --sparsities 0.001,0.0025,0.005,0.01 --data-dir ../shared/data/glue --output-dir OUT

The grid: every sparse method (one with a `sparsity` option) once per sparsity, as `METHOD@SPARSITY`
labels; dense methods (full finetuning, BitFit, …) once. Each task's grid goes through `compare.run_all`
into OUT/<task>/ (runs in OUT/<task>/runs/<label>/, finished ones reused, interrupted ones resumed, the
task's comparison table rewritten after every run), and OUT/report/ is rebuilt after each task, so results
are readable while the sweep goes on. Diff Pruning trains its L0 phase once per variant and task, at the
densest sparsity, and projects it to the others (`share_l0`). benchmarks/sweep_glue.sh runs it over the
shared GLUE tasks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .compare import ALIASES, Entry, parse_entries, run_all, split_label
from .errors import DiffpruneError
from .methods import get_method

DEFAULT_SWEEP_METHODS = ("full", "diff-pruning", "diff-pruning-structured")
DEFAULT_SPARSITIES = (0.001, 0.0025, 0.005, 0.01)  # the paper's Figure 1 / Table 2


def parse_sparsities(text: str) -> list[float]:
    """"0.001,0.005" → [0.001, 0.005]; each must be a number in (0, 1]."""
    values = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            values.append(split_label(f"x@{item}")[1])  # same check and message as a METHOD@SPARSITY label
    if not values:
        raise DiffpruneError("--sparsities needs at least one value, e.g. 0.001,0.005")
    if len(set(values)) != len(values):
        raise DiffpruneError(f"--sparsities lists a value twice: {text}")
    return values


def has_sparsity(label: str) -> bool:
    method = ALIASES[label][0] if label in ALIASES else get_method(label).name
    return "sparsity" in {f.name for f in dataclasses.fields(get_method(method).config_class)}


def grid_labels(methods: list[str], sparsities: list[float]) -> list[str]:
    """Sparse methods once per sparsity (`METHOD@SPARSITY`), dense ones once, in the order given."""
    labels = []
    for method in methods:
        if "@" in method:
            raise DiffpruneError(f"--methods takes plain names ({method!r}); sparsities go in --sparsities")
        labels += [f"{method}@{s:g}" for s in sparsities] if has_sparsity(method) else [method]
    return labels


def share_l0(entries: list[Entry], runs: Path) -> list[Entry]:
    """One L0 phase per Diff Pruning variant: its densest sparsity trains it and keeps its state, and the
    other sparsities project that state (`from_l0`) and train only their fixed-mask phase.

    The source runs first (entries run in order). Projecting down keeps the largest |δ| of the denser
    diff, the paper's projection.
    """
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        if e.method == "diff-pruning" and "sparsity" in e.options and not e.options.get("from_l0"):
            groups.setdefault(split_label(e.label)[0], []).append(e)
    order = list(entries)
    for group in groups.values():
        if len(group) < 2:
            continue
        source = max(group, key=lambda e: e.options["sparsity"])
        source.options["keep_l0_state"] = True
        for e in group:
            if e is not source:
                e.options["from_l0"] = str(runs / source.label)
        order.remove(source)
        order.insert(min(order.index(e) for e in group if e is not source), source)
    return order


def run_sweep(tasks: list[str], labels: list[str], settings: list[str], epochs: float,
              common_for: Callable[[str], list[str]], out: Path) -> bool:
    """Train every (task, label) cell that is missing, then write OUT/report/. True when every cell is ok."""
    from .report import build_report

    parse_entries(labels, settings, epochs)  # every label and --set is checked before anything trains
    ok = True
    for number, task in enumerate(tasks, 1):
        print(f"=== task {task} ({number}/{len(tasks)}): {len(labels)} runs in {out / task}", flush=True)
        rows = run_all(share_l0(parse_entries(labels, settings, epochs), out / task / "runs"), out / task,
                       common_for(task))
        ok = ok and all(r["status"] == "ok" for r in rows)
        if any(r["status"] == "ok" for r in rows):
            build_report([out], out / "report")
            print(f"report updated: {out / 'report' / 'report.md'}", flush=True)
    return ok
