"""Finding finished runs and reading what each one recorded (metrics.json, run_config.json, the diff, log.jsonl).

A run directory is one that holds a metrics.json with "phases" and "final" (what `diffprune train` writes at
the end, see `diffprune.train.pipeline`). `find_runs` accepts run directories and directories that contain
runs at any depth (a `compare` or `sweep` output), and notes the directories where a run started but did not
finish (run_config.json without metrics.json).

A run is placed in the report by (task, variant, sparsity): the variant is the method name, with
"-structured" for structured Diff Pruning (as in `compare` labels); the sparsity is the target t of sparse
methods (the share of diff-pruned entries kept) and None for dense ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import DiffpruneError
from ..archs import group_order, two_stacks  # noqa: F401  (group_order: tables.py takes it from here)
from ..storage import TaskDiff, diff_stats, layer_group, load_diff

DP_VARIANTS = ("diff-pruning-structured", "diff-pruning")  # preference order where one must be picked
_SKIP_DIRS = {"phases", "diff", "checkpoints", "snapshot"}


def fmt_sparsity(t: float | None) -> str:
    """0.0025 → "0.25%"; None (dense) → "dense"."""
    return "dense" if t is None else f"{100 * t:g}%"



def group_kind(name: str) -> str:
    """What kind of parameter group a tensor is: "bias vector", "norm weight" or "weight matrix".

    Names decide, since only sizes are recorded for tensors left out of the diff: a trailing "bias" is a bias
    vector, a weight of a LayerNorm a norm weight, every other weight (embeddings included) a weight matrix.
    """
    parts = name.split(".")
    if parts[-1] == "bias":
        return "bias vector"
    if any("norm" in p.lower() for p in parts[:-1]):
        return "norm weight"
    return "weight matrix"


def main_value(splits: dict | None) -> float | None:
    """The main metric of the first split of {split: {metric: value}} (the dev split; dev_matched for MNLI)."""
    for split, values in (splits or {}).items():
        if split != "train" and isinstance(values, dict):
            value = values.get("main")
            return float(value) if isinstance(value, (int, float)) else None
    return None


@dataclass(eq=False)
class Run:
    """One finished run directory and what it recorded."""
    path: Path
    metrics: dict
    run_config: dict = field(default_factory=dict)
    diff_meta: dict = field(default_factory=dict)   # diff/diff_config.json, read as JSON (no tensors)
    # runs of the same setting with other seeds: the scores below are means over this run and these
    peers: list["Run"] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def task(self) -> str:
        return str(self.metrics.get("task", "?"))

    @property
    def method(self) -> str:
        return str(self.metrics.get("method") or self.diff_meta.get("method") or "?")

    @property
    def options(self) -> dict:
        """The method's options: the stored diff's full config, else those given in run_config.json."""
        return self.diff_meta.get("config") or self.run_config.get("method_options") or {}

    @property
    def variant(self) -> str:
        return f"{self.method}-structured" if self.options.get("structured") else self.method

    @property
    def sparsity(self) -> float | None:
        value = self.options.get("sparsity")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def name(self) -> str:
        """variant@sparsity as shown in the tables: "diff-pruning-structured@0.5%", or just "full"."""
        return self.variant if self.sparsity is None else f"{self.variant}@{fmt_sparsity(self.sparsity)}"

    @property
    def key(self) -> tuple:
        return (self.task, self.variant, self.sparsity)

    @property
    def seed(self):
        return self.run_config.get("seed")

    @property
    def seeds(self) -> list:
        return [r.seed for r in (self, *self.peers)]

    @property
    def dev_main(self) -> float | None:
        return _mean([main_value(r.metrics.get("final")) for r in (self, *self.peers)])

    def phase_main(self, phase: str) -> float | None:
        return _mean([main_value(r.metrics.get("phases", {}).get(phase)) for r in (self, *self.peers)])

    @property
    def storage(self) -> dict:
        return self.metrics.get("storage") or {}

    @property
    def diff_tensors(self) -> dict[str, int] | None:
        """{name: numel} of every diff-pruned tensor, stored or not (recorded by the sparse methods)."""
        value = (self.diff_meta.get("extra") or {}).get("diff_tensors")
        return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else None

    @property
    def diff_tensor_names(self) -> list[str] | None:
        """Names of every diff-pruned tensor: diff_tensors, else the older extra["diff_param_names"]."""
        if self.diff_tensors is not None:
            return list(self.diff_tensors)
        names = (self.diff_meta.get("extra") or {}).get("diff_param_names")
        return [str(n) for n in names] if isinstance(names, list) else None

    @cached_property
    def diff(self) -> TaskDiff:
        return load_diff(self.path / "diff")

    @cached_property
    def stats(self) -> dict:
        return diff_stats(self.diff, self.path / "diff")

    def log_records(self) -> list[dict]:
        """Training log records (those with a loss), one per (phase, step): a resumed run logs some twice."""
        path = self.path / "log.jsonl"
        if not path.is_file():
            return []
        by_step: dict[tuple, dict] = {}
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and ("loss" in record or "task_loss" in record):
                by_step[(record.get("phase"), record.get("step"))] = record
        return list(by_step.values())

    def group_numel(self) -> dict[str, int]:
        """Diff-pruned parameters per layer group (from diff_tensors; empty when not recorded)."""
        out: dict[str, int] = {}
        stacks = two_stacks(self.diff_tensors or {})
        for name, numel in (self.diff_tensors or {}).items():
            group = layer_group(name, stacks)
            out[group] = out.get(group, 0) + numel
        return out


def _mean(values: list) -> float | None:
    """Mean of the values that exist (a seed whose run lacks a phase is left out, not counted as 0)."""
    have = [v for v in values if v is not None]
    return sum(have) / len(have) if have else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DiffpruneError(f"{path} cannot be read as JSON ({exc})") from exc
    return value if isinstance(value, dict) else {}


def is_finished_run(directory: Path) -> bool:
    """Whether `directory` is a finished run: a metrics.json with its phases and final results."""
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        return False
    metrics = _read_json(path)
    return "phases" in metrics and "final" in metrics


def load_run(directory: Path) -> Run:
    metrics = _read_json(directory / "metrics.json")
    config = _read_json(directory / "run_config.json") if (directory / "run_config.json").is_file() else {}
    meta_path = directory / "diff" / "diff_config.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    return Run(directory, metrics, config, meta)


def find_runs(paths: list[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """Every finished run under `paths` (sorted by path, each once) and notes on what was left out."""
    found: dict[Path, Run] = {}
    unfinished: list[Path] = []
    for given in paths:
        root = Path(given)
        if not root.is_dir():
            raise DiffpruneError(f"{root} is not a directory (give run directories or folders that hold runs)")
        for current, dirs, _files in os.walk(root):
            here = Path(current)
            if is_finished_run(here):
                found.setdefault(here.resolve(), load_run(here))
                dirs[:] = []  # a run's own sub-folders (phases/, diff/) hold no further runs
                continue
            if (here / "run_config.json").is_file():
                unfinished.append(here)
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
    if not found:
        raise DiffpruneError(f"no finished run (a metrics.json with final results) under {', '.join(map(str, paths))}")
    runs = sorted(found.values(), key=lambda r: str(r.path))
    notes = []
    if unfinished:
        notes.append(f"{len(unfinished)} run director{'y has' if len(unfinished) == 1 else 'ies have'} not "
                     "finished (no metrics.json), left out: "
                     + ", ".join(str(p) for p in unfinished[:5]) + (" …" if len(unfinished) > 5 else ""))
    unique: dict[tuple, Run] = {}
    for run in runs:
        first = unique.get(run.key)
        if first is None:
            unique[run.key] = run
        elif run.seed is not None and run.seed not in first.seeds:
            first.peers.append(run)  # another seed of the same setting: averaged
        else:
            notes.append(f"{run.path} repeats {run.task} / {run.name} of {first.path} with the same seed; the "
                         "first is used")
    averaged = sorted({(r.task, tuple(r.seeds)) for r in unique.values() if r.peers})
    for task, seeds in averaged:
        notes.append(f"{task}: scores are means over seeds {', '.join(map(str, seeds))} where runs of "
                     "several seeds exist")
    return list(unique.values()), notes


def settings_summary(runs: list[Run]) -> list[tuple[str, str]]:
    """(setting, value(s)) pairs from run_config.json: one value when every run agrees, else all of them."""
    def values(get) -> str:
        seen = []
        for run in runs:
            if run.run_config:
                value = get(run)
                if value not in seen:
                    seen.append(value)
        return ", ".join("–" if v is None else str(v) for v in seen) if seen else "(no run_config.json)"

    def epochs(run: Run):
        opts = run.run_config.get("method_options") or {}
        total = sum(v for k, v in opts.items() if k.endswith("epochs") and isinstance(v, (int, float)))
        return f"{total:g}" if total else "method default"

    def cap(run: Run):
        n = run.run_config.get("max_train_samples")
        return "full training set" if n is None else f"{n} (seeded random subset)"

    cfg = lambda key: (lambda run: run.run_config.get(key))  # noqa: E731
    return [("model", values(cfg("model"))), ("training examples per task", values(cap)),
            ("dev examples per task", values(lambda r: r.run_config.get("max_eval_samples") or "all")),
            ("total epochs per run (all phases)", values(epochs)), ("batch size", values(cfg("batch_size"))),
            ("max length", values(cfg("max_length"))), ("seed", values(cfg("seed"))),
            ("warmup share", values(cfg("warmup"))), ("data", values(cfg("data_dir")))]
