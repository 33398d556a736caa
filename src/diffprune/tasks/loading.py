"""Reading a task's examples into `datasets.Dataset`s with one fixed schema.

`load_task_data(spec, data_dir)` returns a `TaskData` whose splits all have the columns "text_a",
optionally "text_b", and "label" (int class index in `spec.label_names` order, or float32 for regression),
whatever the source: a local GLUE folder, the user's own CSV / TSV / JSONL files, or the Hugging Face hub.

GLUE files are read the way GLUE's own readers read them: tab-separated with quote processing OFF (RTE and
others contain unbalanced `"`), `utf-8-sig` (MRPC starts with a byte-order mark), CoLA without a header.
Every problem a user can cause (missing folder, file, column, unknown label, wrong column count, empty split)
is a `DiffpruneError` naming the file and line.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from diffprune.errors import DiffpruneError
from diffprune.tasks.specs import TaskSpec

FLOAT32_MAX = 3.4028234663852886e38
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a few GLUE rows (QNLI, MNLI) hold long passages


@dataclass
class TaskData:
    """The train split and the named evaluation splits of one task, all with the same columns."""

    spec: TaskSpec
    train: datasets.Dataset
    evals: dict[str, datasets.Dataset]


def read_table(path, has_header: bool = True):
    """(header or None, [(line number, row)]) of a .tsv/.txt (tab, no quoting), .csv or .jsonl/.json file.

    Rows are lists of strings (JSON values other than strings are turned into strings; a missing key
    becomes None). Blank lines are skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    if suffix in (".tsv", ".txt", ""):
        kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE)
    elif suffix == ".csv":
        kwargs = {}
    else:
        raise DiffpruneError(f"unsupported data file type '{suffix}' for {path} (use .csv, .tsv or .jsonl)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, **kwargs)
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except csv.Error as exc:
        raise DiffpruneError(f"{path}:{reader.line_num}: {exc}") from None
    header = None
    if has_header:
        if not rows:
            raise DiffpruneError(f"{path} is empty (expected a header line)")
        header = [h.strip() for h in rows.pop(0)[1]]
    return header, rows


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DiffpruneError:
    """Name the line of the first byte that is not UTF-8 (the decoder's offset is not the file's)."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DiffpruneError(f"{path}:{line}: byte 0x{raw[bad.start]:02x} at column {bad.start + 1} is "
                                      "not UTF-8 text; save the file as UTF-8")
    return DiffpruneError(f"{path} is not UTF-8 text ({exc.reason}); save the file as UTF-8")


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    records = []
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise DiffpruneError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    else:  # one record per "\n"-separated line (str.splitlines would also split at U+2028 inside strings)
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DiffpruneError(f"{path}:{i}: not a valid JSON line ({e.msg}, column {e.colno})") from None
    header: list[str] = []
    for i, rec in records:
        if not isinstance(rec, dict):
            raise DiffpruneError(f"{path}:{i}: expected a JSON object per record, got {type(rec).__name__}")
        header += [k for k in rec if k not in header]

    def cell(v):
        return None if v is None else v if isinstance(v, str) else json.dumps(v)

    return header, [(i, [cell(rec.get(k)) for k in header]) for i, rec in records]


def _column_index(col, header, width: int, path: Path) -> int:
    if isinstance(col, int):
        if not -width <= col < width:
            raise DiffpruneError(f"column {col} is out of range in {path}, which has {width} columns")
        return col % width
    if header is None:
        raise DiffpruneError(f"column '{col}' needs a header line, but {path} is read without one")
    if col not in header:
        raise DiffpruneError(f"column '{col}' not found in {path} (available: {', '.join(header)})")
    return header.index(col)


def _read_split(spec: TaskSpec, path: Path, split: str) -> dict[str, list]:
    """Parse one file into {"text_a", ["text_b"], "label"} lists, validating every row."""
    if not path.is_file():
        raise DiffpruneError(f"data file not found: {path} (split '{split}' of task '{spec.name}')")
    header, rows = read_table(path, has_header=spec.has_header)
    width = len(header) if header is not None else (len(rows[0][1]) if rows else 0)
    if not rows:
        raise DiffpruneError(f"split '{split}' of task '{spec.name}' is empty ({path})")
    text_idx = [_column_index(c, header, width, path) for c in spec.text_columns]
    label_idx = _column_index(spec.label_column, header, width, path)
    label_map = None if spec.is_regression else {n: i for i, n in enumerate(spec.label_names)}
    texts: list[list[str]] = [[] for _ in text_idx]
    labels: list = []
    for line, row in rows:
        if len(row) != width:
            if spec.skip_malformed:
                continue
            kind = ("a JSON object per line with the same keys" if path.suffix.lower() in (".json", ".jsonl")
                    else "comma-separated with one example per line" if path.suffix.lower() == ".csv"
                    else "tab-separated with one example per line")
            raise DiffpruneError(f"{path}:{line} has {len(row)} columns but expected {width} (is the file "
                                 f"{kind}?)")
        raw = row[label_idx]
        value = "" if raw is None else raw.strip()
        if label_map is None:
            try:
                number = float(value)
            except ValueError:
                raise DiffpruneError(f"label '{value}' at {path}:{line} is not a number "
                                     f"(task '{spec.name}' is a regression task)") from None
            if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
                raise DiffpruneError(f"label '{value}' at {path}:{line} is not a finite number (regression "
                                     "labels must be finite float32 values)")
            labels.append(number)
        else:
            if value not in label_map:
                raise DiffpruneError(f"label '{value}' at {path}:{line} is not one of the labels of task "
                                     f"'{spec.name}' ({', '.join(spec.label_names)})")
            labels.append(label_map[value])
        for j, idx in enumerate(text_idx):
            texts[j].append("" if row[idx] is None else row[idx])
    if not labels:
        raise DiffpruneError(f"split '{split}' of task '{spec.name}' is empty ({path})")
    out = {"text_a": texts[0]}
    if len(texts) == 2:
        out["text_b"] = texts[1]
    out["label"] = labels
    return out


def _features(spec: TaskSpec) -> datasets.Features:
    cols = {"text_a": datasets.Value("string")}
    if len(spec.text_columns) == 2:
        cols["text_b"] = datasets.Value("string")
    cols["label"] = datasets.Value("float32" if spec.is_regression else "int64")
    return datasets.Features(cols)


def _subsample_indices(n: int, k: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of size k (None when all n rows are kept)."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _check_limit(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise DiffpruneError(f"{name} must be a positive integer or None, got {value!r}")


def _task_dir(spec: TaskSpec, data_dir) -> Path:
    """The folder holding the task's files: data_dir/<local_dir>, or data_dir itself if it is that folder."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DiffpruneError(f"data directory not found: {root}")
    if not spec.local_dir:
        return root
    if (root / spec.local_dir).is_dir():
        return root / spec.local_dir
    for child in sorted(root.iterdir()):  # tolerate "sst-2" or "rte" for "SST-2" / "RTE"
        if child.is_dir() and child.name.lower() == spec.local_dir.lower():
            return child
    if (root / spec.train_file).is_file():
        return root
    raise DiffpruneError(f"data file not found: {root / spec.local_dir / spec.train_file} "
                         f"(--data-dir should hold a '{spec.local_dir}' folder, or be that folder)")


def _from_files(spec: TaskSpec, base: Path, max_train, max_eval, seed) -> TaskData:
    features = _features(spec)

    def build(split, file, limit):
        cols = _read_split(spec, base / file, split)
        idx = _subsample_indices(len(cols["label"]), limit, seed)
        if idx is not None:
            cols = {k: [v[i] for i in idx] for k, v in cols.items()}
        return datasets.Dataset.from_dict(cols, features=features)

    train = build("train", spec.train_file, max_train)
    evals = {split: build(split, file, max_eval) for split, file in spec.eval_files.items()}
    return TaskData(spec, train, evals)


def _from_hub(spec: TaskSpec, max_train, max_eval, seed) -> TaskData:
    try:
        raw = datasets.load_dataset(*spec.hub)
    except Exception as e:  # offline, hub down, renamed dataset: one clear line with the way out
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DiffpruneError(f"could not load '{spec.name}' from the hub ({reason}); pass --data-dir "
                             f"with a local GLUE copy holding a '{spec.local_dir}' folder") from None
    features = _features(spec)
    names = ["text_a", "text_b"][:len(spec.hub_text_columns)]

    def build(split, hub_split, limit):
        if hub_split not in raw:
            raise DiffpruneError(f"hub dataset {'/'.join(spec.hub)} has no split '{hub_split}' "
                                 f"(has: {', '.join(raw)})")
        ds = raw[hub_split]
        keep = [*spec.hub_text_columns, spec.hub_label_column]
        ds = ds.select_columns(keep)
        ds = ds.rename_columns({**dict(zip(spec.hub_text_columns, names)), spec.hub_label_column: "label"})
        ds = ds.cast(features)
        idx = _subsample_indices(len(ds), limit, seed)
        ds = ds if idx is None else ds.select(idx)
        if len(ds) == 0:
            raise DiffpruneError(f"split '{split}' of task '{spec.name}' is empty on the hub")
        return ds

    train = build("train", "train", max_train)
    evals = {s: build(s, h, max_eval) for s, h in spec.hub_eval_splits.items()}
    return TaskData(spec, train, evals)


def load_task_data(spec: TaskSpec, data_dir=None, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None, seed: int = 0) -> TaskData:
    """Load a task's train and eval splits, whatever its kind (the kind's own loader, `kinds.py`)."""
    from diffprune.tasks.kinds import task_kind

    return task_kind(spec).load(spec, data_dir, max_train_samples, max_eval_samples, seed)


def load_table_task(spec: TaskSpec, data_dir=None, max_train_samples: int | None = None,
                    max_eval_samples: int | None = None, seed: int = 0) -> TaskData:
    """Load a classification / regression task's train and eval splits.

    With `data_dir`, reads data_dir/<spec.local_dir>/<file> (or data_dir/<file> when data_dir is the task
    folder itself). Without it, custom tasks read their own file paths and GLUE tasks come from the hub.
    `max_*_samples` keep a seeded random subset (same seed, same rows; original order preserved).
    """
    _check_limit("max_train_samples", max_train_samples)
    _check_limit("max_eval_samples", max_eval_samples)
    if data_dir is not None:
        return _from_files(spec, _task_dir(spec, data_dir), max_train_samples, max_eval_samples, seed)
    if not spec.local_dir:  # custom task: absolute file paths
        return _from_files(spec, Path(), max_train_samples, max_eval_samples, seed)
    if spec.hub is None:
        raise DiffpruneError(f"task '{spec.name}' has no hub copy; pass --data-dir with its files")
    return _from_hub(spec, max_train_samples, max_eval_samples, seed)


__all__ = ["TaskData", "load_task_data", "load_table_task", "read_table"]
