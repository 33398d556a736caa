"""`diffprune compare`: several methods on one task at the same budget, as one table and one plot.

Each method runs as its own `diffprune train` process in OUT/runs/<label>/ (so its peak memory is its
own), with the same data, seed, batch size and total number of epochs; a two-phase method splits the
epochs between its phases (`Method.budget`). A run that already finished (metrics.json present) is
reused and an interrupted one continues with --resume, so a stopped comparison picks up where it was.
A label `METHOD@SPARSITY` (`lt-sft@0.0025`, `diff-pruning-structured@0.001`) runs that method with that
sparsity, in OUT/runs/<label>/; `--set METHOD.key=value` reaches every sparsity of METHOD.

Results: OUT/comparison.md (Markdown), OUT/comparison.csv and OUT/comparison.png (dev metric against
stored bytes per task, log scale), each written atomically after every finished run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import DiffpruneError
from .methods import METHODS, get_method
from .report.collect import is_finished_run, load_run
from .report.comparison import comparison_row, write_outputs

# Named variants a user can list next to plain method names.
ALIASES: dict[str, tuple[str, dict]] = {
    "diff-pruning-structured": ("diff-pruning", {"structured": True}),
}
DEFAULT_METHODS = ("full", "last-layer", "bitfit", "adapter-houlsby", "adapter-pfeiffer", "lora",
                   "non-adaptive-diff-pruning", "lt-sft", "diff-pruning", "diff-pruning-structured")


@dataclass
class Entry:
    """One row of the comparison: a method (or named variant) with its options."""
    label: str
    method: str
    options: dict = field(default_factory=dict)


def parse_entries(labels: list[str], settings: list[str], epochs: float) -> list[Entry]:
    """Methods to compare, with the shared budget and `--set [LABEL.]key=value` options applied."""
    entries, label_sparsity = [], {}
    for label in labels:
        name, sparsity = split_label(label)
        if name in ALIASES:
            method, options = ALIASES[name]
        else:
            get_method(name)  # unknown names fail here, with a did-you-mean over methods
            method, options = name, {}
        if sparsity is not None:
            check_sparsity_option(label, method)
            label_sparsity[label] = sparsity
        entries.append(Entry(label, method, {**get_method(method).budget(epochs), **options}))
    if len({e.label for e in entries}) != len(entries):
        raise DiffpruneError("each method may be listed once in --methods")
    by_label = {e.label: e for e in entries}
    by_name: dict[str, list[Entry]] = {}  # `--set lt-sft.lr=…` reaches every lt-sft@SPARSITY entry too
    for e in entries:
        by_name.setdefault(split_label(e.label)[0], []).append(e)
    for item in settings:
        if "=" not in item:
            raise DiffpruneError(f"--set expects [METHOD.]key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        target, _, name = key.rpartition(".")
        if target and target not in by_label and target not in by_name:
            raise DiffpruneError(f"--set {item!r}: {target!r} is not one of the compared methods "
                                 f"({', '.join(by_label)})")
        for entry in (([by_label[target]] if target in by_label else by_name[target]) if target else entries):
            entry.options[name.replace("-", "_")] = value
    for entry in entries:  # the sparsity in a label wins over --set, so a run is what its label says
        if entry.label in label_sparsity:
            entry.options["sparsity"] = label_sparsity[entry.label]
    return entries


def split_label(label: str) -> tuple[str, float | None]:
    """`METHOD@SPARSITY` → (METHOD, sparsity); a plain label → (label, None).

    The sparsity is the share of diff-pruned entries kept, as for --sparsity: `lt-sft@0.0025` keeps 0.25%.
    """
    if "@" not in label:
        return label, None
    name, _, text = label.partition("@")
    try:
        sparsity = float(text)
    except ValueError:
        raise DiffpruneError(f"{label!r}: the part after '@' must be a sparsity such as 0.005 (0.5%), "
                             f"got {text!r}") from None
    if not 0.0 < sparsity <= 1.0:
        raise DiffpruneError(f"{label!r}: the sparsity after '@' is the share of entries kept, in (0, 1], "
                             f"got {text} (0.005 keeps 0.5%)")
    return name, sparsity


def check_sparsity_option(label: str, method: str) -> None:
    if "sparsity" not in {f.name for f in fields(get_method(method).config_class)}:
        raise DiffpruneError(f"{label!r}: method {method} has no sparsity option, so it takes no '@SPARSITY' "
                             "(list it without one)")


def train_command(entry: Entry, run_dir: Path, common: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "diffprune", "train", "--method", entry.method, "--output-dir", str(run_dir),
           "--no-progress", *common]
    for key, value in entry.options.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd + (["--resume"] if resume else [])


def run_all(entries: list[Entry], out: Path, common: list[str]) -> list[dict]:
    """Train what is missing (one process each), then collect every run; returns the table rows."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, entry in enumerate(entries, 1):
        run_dir = runs / entry.label
        log_path = runs / f"{entry.label}.log"
        if (run_dir / "metrics.json").exists():
            print(f"[{number}/{len(entries)}] {entry.label}: finished earlier, reused", flush=True)
        else:
            resume = run_dir.exists() and any(run_dir.iterdir())
            print(f"[{number}/{len(entries)}] {entry.label}: {'resuming' if resume else 'training'} "
                  f"(log: {log_path})", flush=True)
            start = time.perf_counter()
            with open(log_path, "a") as log:
                code = subprocess.call(train_command(entry, run_dir, common, resume), stdout=log,
                                       stderr=subprocess.STDOUT)
            if code != 0:
                print(f"    FAILED with exit code {code}; last line: {_last_line(log_path)}", flush=True)
            else:
                print(f"    done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        rows.append(collect(entry, run_dir))
        write_outputs(rows, out)
    return rows


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def collect(entry: Entry, run_dir: Path) -> dict:
    """One table row from a run directory (status 'failed' if it did not finish), read as `report` reads it."""
    if not is_finished_run(run_dir):
        return {"method": entry.label, "status": "failed"}
    return comparison_row(entry.label, load_run(run_dir).metrics)


def known_labels() -> list[str]:
    from .methods import _load_all  # noqa: F401

    return sorted(set(METHODS) | set(ALIASES))
