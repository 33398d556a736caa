"""Tasks as data: one `TaskSpec` per GLUE task, plus `custom_task` for a user's own files.

A spec says where a task's examples live (a GLUE folder and file names, or a Hugging Face hub id), which
columns hold the texts and the label, the label names in the order the model's outputs use, and which
metrics judge it. Nothing here reads data (see `loading.py`) or computes a score (see `metrics.py`);
adding a GLUE-like task is adding one entry to `_GLUE`.

Label orders follow the `nyu-mll/glue` hub datasets, so a model trained on the local GLUE files and one
trained on the hub copy agree on what output 0 means (e.g. RTE: 0 = entailment, WNLI: 0 = not_entailment).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffprune.errors import DiffpruneError, unknown_name
from diffprune.tasks.metrics import METRICS
from diffprune.tasks.qa_metrics import QA_METRICS

# the metric names each kind of task can be judged by (see `kinds.py` for the kinds themselves)
KIND_METRICS = {"classification": tuple(METRICS), "qa": QA_METRICS}


@dataclass(frozen=True)
class TaskSpec:
    """A text-classification or regression task described as data.

    Fields:
        name: registry name ("rte", or the user's name for a custom task).
        text_columns: one or two source columns holding the texts (header names, or 0-based indices for
            files without a header; negative indices count from the end of the row).
        label_column: source column holding the label (name or index, as above).
        label_names: class names in output order, as they appear in the files; None means regression
            (one output, float labels).
        metrics: metric names from `diffprune.tasks.metrics.METRICS`.
        main_metric: the metric that decides (model selection, reported score); all are higher-is-better.
        local_dir: folder under a GLUE data directory ("RTE", "SST-2"); "" for custom tasks.
        train_file / eval_files: file names inside `local_dir` (absolute paths for custom tasks);
            eval_files maps our split name to a file, e.g. {"dev": "dev.tsv"}.
        has_header: whether the first line names the columns (CoLA: False).
        hub: (path, config) for `datasets.load_dataset`, or None when the task exists only as files.
        hub_eval_splits: our split name -> hub split name, e.g. {"dev": "validation"}.
        hub_text_columns / hub_label_column: column names in the hub copy (labels there are ints in
            `label_names` order, floats for regression).
        skip_malformed: drop rows with the wrong number of columns instead of failing (QQP only, as
            GLUE's own reader does); otherwise such a row is an error.
        kind: "classification" (classification or regression) or "qa" (SQuAD-format extractive question
            answering: text_columns name the question and the context, label_column the answers); the
            plug-in in `diffprune.tasks.kinds` that loads, tokenizes and scores the task.
    """

    name: str
    text_columns: tuple[str | int, ...]
    label_column: str | int
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    local_dir: str
    train_file: str = "train.tsv"
    eval_files: dict[str, str] = field(default_factory=lambda: {"dev": "dev.tsv"})
    has_header: bool = True
    hub: tuple[str, str | None] | None = None
    hub_eval_splits: dict[str, str] = field(default_factory=lambda: {"dev": "validation"})
    hub_text_columns: tuple[str, ...] = ()
    hub_label_column: str = "label"
    skip_malformed: bool = False
    kind: str = "classification"

    def __post_init__(self):
        # Normalise sequences to tuples and copy the dicts so specs never share mutable state.
        object.__setattr__(self, "text_columns", tuple(self.text_columns))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "hub_text_columns", tuple(self.hub_text_columns))
        object.__setattr__(self, "eval_files", dict(self.eval_files))
        object.__setattr__(self, "hub_eval_splits", dict(self.hub_eval_splits))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        if len(self.text_columns) not in (1, 2):
            raise DiffpruneError(f"task '{self.name}': give 1 or 2 text columns, got {len(self.text_columns)}")
        if self.label_names is not None and len(set(self.label_names)) < 2:
            raise DiffpruneError(f"task '{self.name}': a classification task needs at least 2 distinct labels, "
                                 f"got {list(self.label_names)}")
        if self.kind not in KIND_METRICS:
            raise unknown_name("task kind", self.kind, KIND_METRICS)
        if self.kind != "classification" and self.label_names is not None:
            raise DiffpruneError(f"task '{self.name}': a {self.kind} task has no label names")
        for m in self.metrics:
            if m not in KIND_METRICS[self.kind]:
                raise unknown_name("metric", m, KIND_METRICS[self.kind])
        if self.main_metric not in self.metrics:
            raise DiffpruneError(f"task '{self.name}': main metric '{self.main_metric}' is not one of its "
                                 f"metrics {list(self.metrics)}")
        if not self.eval_files:
            raise DiffpruneError(f"task '{self.name}': give at least one evaluation file")

    def __hash__(self):
        # The dict fields make the generated hash fail; specs are immutable in practice, so hash the
        # identifying fields and keep specs usable as dict keys and cache arguments.
        return hash((self.name, self.kind, self.text_columns, self.label_column, self.label_names, self.train_file,
                     tuple(sorted(self.eval_files.items())), self.hub))

    @property
    def is_regression(self) -> bool:
        return self.kind == "classification" and self.label_names is None

    @property
    def num_labels(self) -> int:
        """Outputs per position of the task head: classes, 1 for regression, 2 (start, end) for QA."""
        if self.kind == "qa":
            return 2
        return 1 if self.label_names is None else len(self.label_names)


_BIN = ("0", "1")
_ACC = dict(metrics=("accuracy",), main_metric="accuracy")
_F1 = dict(metrics=("f1", "accuracy"), main_metric="f1")

_GLUE: dict[str, TaskSpec] = {s.name: s for s in [
    # CoLA has no header: source, label, original mark, sentence.
    TaskSpec("cola", (3,), 1, _BIN, ("mcc",), "mcc", "CoLA", has_header=False,
             hub=("nyu-mll/glue", "cola"), hub_text_columns=("sentence",)),
    TaskSpec("sst2", ("sentence",), "label", _BIN, local_dir="SST-2",
             hub=("nyu-mll/glue", "sst2"), hub_text_columns=("sentence",), **_ACC),
    TaskSpec("mrpc", ("#1 String", "#2 String"), "Quality", _BIN, local_dir="MRPC",
             hub=("nyu-mll/glue", "mrpc"), hub_text_columns=("sentence1", "sentence2"), **_F1),
    # STS-B: sentences are columns 7 and 8 and the score is the last column (as GLUE's reader takes them).
    TaskSpec("stsb", (7, 8), -1, None, ("spearman", "pearson"), "spearman", "STS-B",
             hub=("nyu-mll/glue", "stsb"), hub_text_columns=("sentence1", "sentence2")),
    # QQP: GLUE's reader skips the few rows that are cut short; we do the same.
    TaskSpec("qqp", ("question1", "question2"), "is_duplicate", _BIN, local_dir="QQP", skip_malformed=True,
             hub=("nyu-mll/glue", "qqp"), hub_text_columns=("question1", "question2"), **_F1),
    TaskSpec("mnli", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             local_dir="MNLI",
             eval_files={"dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
             hub=("nyu-mll/glue", "mnli"),
             hub_eval_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"},
             hub_text_columns=("premise", "hypothesis"), **_ACC),
    TaskSpec("qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"), local_dir="QNLI",
             hub=("nyu-mll/glue", "qnli"), hub_text_columns=("question", "sentence"), **_ACC),
    TaskSpec("rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), local_dir="RTE",
             hub=("nyu-mll/glue", "rte"), hub_text_columns=("sentence1", "sentence2"), **_ACC),
    # WNLI files use 0/1 with 1 = entailment, which is also the hub's order (0 = not_entailment).
    TaskSpec("wnli", ("sentence1", "sentence2"), "label", _BIN, local_dir="WNLI",
             hub=("nyu-mll/glue", "wnli"), hub_text_columns=("sentence1", "sentence2"), **_ACC),
]}

# Extractive question answering (kinds.py "qa"): `--data-dir` holds train.json / dev.json (or the official
# train-v1.1.json / dev-v1.1.json); the hub copy is rajpurkar/squad. Scores are fractions, main: F1.
_QA: dict[str, TaskSpec] = {s.name: s for s in [
    TaskSpec("squad", ("question", "context"), "answers", None, ("exact_match", "f1"), "f1", "squad",
             train_file="train.json", eval_files={"dev": "dev.json"}, hub=("rajpurkar/squad", None),
             hub_text_columns=("question", "context"), hub_label_column="answers", kind="qa"),
]}
_TASKS = {**_GLUE, **_QA}

_ALIASES = {"squad1.1": "squad", "squad-v1.1": "squad", "sst-2": "sst2", "sts-b": "stsb", "sst_2": "sst2", "sts_b": "stsb"}


def list_tasks() -> list[str]:
    """The registered task names: GLUE's and SQuAD (aliases such as "sst-2" are accepted by `get_task` too)."""
    return list(_TASKS)


def get_task(name: str) -> TaskSpec:
    """Look up a task by name, case-insensitively; unknown names get a "did you mean" error."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _TASKS:
        raise unknown_name("task", str(name), _TASKS)
    return _TASKS[key]


# ----------------------------------------------------------------------------------------------------
# Custom tasks: the user's own CSV / TSV / JSONL files.

def _label_sort_key(value: str):
    # Numeric labels sort as numbers ("2" before "10"); anything else sorts as text after them.
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _infer_label_names(train_file: Path, label_column: str) -> tuple[str, ...]:
    # Local import: loading.py imports this module.
    from diffprune.tasks.loading import read_table

    header, rows = read_table(train_file, has_header=True)
    if label_column not in header:
        raise DiffpruneError(f"column '{label_column}' not found in {train_file} "
                             f"(available: {', '.join(map(str, header))})")
    col = header.index(label_column)
    values = {row[col].strip() for _, row in rows if len(row) > col and row[col] is not None}
    values.discard("")
    if len(values) < 2:
        raise DiffpruneError(f"the label column '{label_column}' of {train_file} has {len(values)} distinct "
                             f"value(s); a classification task needs at least 2 (use regression=True for scores)")
    return tuple(sorted(values, key=_label_sort_key))


def custom_task(train_file, eval_files, text_columns, label_column: str,
                label_names: list[str] | None = None, regression: bool = False,
                name: str = "custom") -> TaskSpec:
    """A task over the user's own files (.csv, .tsv, .jsonl / .json by extension; a header is required).

    `eval_files` is one path (split "dev") or a dict split name -> path. For classification, `label_names`
    defaults to the sorted distinct labels of the train file (numeric labels sorted as numbers); metrics
    are accuracy and macro-F1 (main: accuracy). For `regression=True`, labels are floats and the metrics
    are Spearman and Pearson (main: Spearman).
    """
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    if not eval_files:
        raise DiffpruneError("custom task: give an evaluation file (e.g. --dev-file dev.tsv)")
    if isinstance(eval_files, (str, Path)):
        eval_files = {"dev": eval_files}
    train_path = Path(train_file).expanduser().resolve()
    evals = {str(k): str(Path(v).expanduser().resolve()) for k, v in dict(eval_files).items()}
    for path in [train_path, *map(Path, evals.values())]:
        if not path.is_file():
            raise DiffpruneError(f"data file not found: {path}")
    if regression and label_names is not None:
        raise DiffpruneError("custom task: give label_names only for classification, not with regression=True")
    if regression:
        labels, metrics, main = None, ("spearman", "pearson"), "spearman"
    else:
        labels = tuple(map(str, label_names)) if label_names is not None \
            else _infer_label_names(train_path, label_column)
        metrics, main = ("accuracy", "macro_f1"), "accuracy"
    return TaskSpec(name=name, text_columns=tuple(text_columns), label_column=label_column,
                    label_names=labels, metrics=metrics, main_metric=main, local_dir="",
                    train_file=str(train_path), eval_files=evals, has_header=True, hub=None,
                    hub_eval_splits={}, hub_text_columns=())


__all__ = ["TaskSpec", "list_tasks", "get_task", "custom_task"]
