"""Kinds of task, as plug-ins: what the training pipeline, `eval`, `merge` and head importance ask of a task.

A `TaskSpec` names its kind (`spec.kind`); the pipeline never branches on it, it calls the kind's verbs:

    kind = task_kind(spec)
    data = kind.load(spec, data_dir, max_train, max_eval, seed)          # TaskData
    model, tokenizer, head = load_model(name, …, auto_class=kind.auto_class)
    train_ds = kind.train_features(data.train, tokenizer, spec, max_length, doc_stride)
    evals = {s: kind.eval_split(d, tokenizer, spec, max_length, doc_stride) for s, d in data.evals.items()}
    metrics = evals["dev"].score(predictions, label_ids)                  # {metric: value, "main": …}
    evals["dev"].outputs                                                  # files to write ({} or predictions.json)

`classification` (text classification and regression, the GLUE tasks and custom CSV/TSV/JSONL tasks) and
`qa` (SQuAD-format extractive question answering, `qa.py` / `qa_features.py` / `qa_metrics.py`) are the
kinds; a new one is one more class registered in `KINDS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import datasets

from diffprune.errors import unknown_name


@dataclass
class EvalSplit:
    """One tokenized evaluation split and how to score the model's outputs on it.

    `score(predictions, label_ids)` returns the metrics with "main"; it may fill `outputs` with JSON files
    to write next to the metrics (QA: predictions.json, question id -> answer text).
    """

    dataset: datasets.Dataset
    score: Callable[[Any, Any], dict]
    outputs: dict[str, Any] = field(default_factory=dict)


class Classification:
    """Sequence classification and regression: one row per example, logits (N, C) or scores (N,)."""

    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    label_keys = ("labels",)
    default_max_length = 128

    def load(self, spec, data_dir, max_train, max_eval, seed):
        from diffprune.tasks.loading import load_table_task

        return load_table_task(spec, data_dir, max_train, max_eval, seed)

    def train_features(self, dataset, tokenizer, spec, max_length: int, doc_stride: int = 0):
        from diffprune.train.data import tokenize

        return tokenize(dataset, tokenizer, max_length, spec.is_regression)

    def eval_split(self, dataset, tokenizer, spec, max_length: int, doc_stride: int = 0) -> EvalSplit:
        from diffprune.tasks.metrics import compute_metrics

        return EvalSplit(self.train_features(dataset, tokenizer, spec, max_length),
                         lambda predictions, labels: compute_metrics(spec, predictions, labels))

    def collator(self, tokenizer):
        from diffprune.train.data import collator

        return collator(tokenizer)

    def model_kwargs(self, spec) -> dict:
        """What `load_model` needs to size the head: the label count and names."""
        return {"num_labels": spec.num_labels, "label_names": list(spec.label_names) if spec.label_names else None}


class QuestionAnswering:
    """Extractive QA: windows over question + context in, a span (start and end logits) out."""

    name = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    label_keys = ("start_positions", "end_positions")
    default_max_length = 384

    def load(self, spec, data_dir, max_train, max_eval, seed):
        from diffprune.tasks.qa import load_squad

        return load_squad(spec, data_dir, max_train, max_eval, seed)

    def _windows(self, dataset, tokenizer, max_length: int, doc_stride: int):
        from diffprune.tasks.qa_features import encode_windows

        cols = dataset[:]
        windows = encode_windows(tokenizer, cols["id"], cols["question"], cols["context"], cols["answer_texts"],
                                 cols["answer_starts"], max_length, doc_stride)
        data = {**windows.inputs, "start_positions": windows.start_positions, "end_positions": windows.end_positions}
        ds = datasets.Dataset.from_dict(data)
        ds.set_format("torch")
        return ds, windows, cols

    def train_features(self, dataset, tokenizer, spec, max_length: int, doc_stride: int = 128):
        return self._windows(dataset, tokenizer, max_length, doc_stride)[0]

    def eval_split(self, dataset, tokenizer, spec, max_length: int, doc_stride: int = 128) -> EvalSplit:
        from diffprune.tasks.qa_features import best_answers
        from diffprune.tasks.qa_metrics import squad_scores

        ds, windows, cols = self._windows(dataset, tokenizer, max_length, doc_stride)

        def score(predictions, labels) -> dict:
            start, end = predictions[0], predictions[1]
            answers = best_answers(start, end, windows, cols["context"])
            predicted = dict(zip(cols["id"], answers))
            split.outputs["predictions.json"] = predicted
            metrics = squad_scores(predicted, dict(zip(cols["id"], cols["answer_texts"])))
            return {**metrics, "main": metrics[spec.main_metric]}

        split = EvalSplit(ds, score)
        return split

    def collator(self, tokenizer):
        from diffprune.train.data import right_padding_collator

        return right_padding_collator(tokenizer)

    def model_kwargs(self, spec) -> dict:
        return {"num_labels": 2, "label_names": None}


KINDS = {k.name: k for k in (Classification(), QuestionAnswering())}


def task_kind(spec_or_name) -> Classification | QuestionAnswering:
    """The kind plug-in of a TaskSpec (or a kind name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else getattr(spec_or_name, "kind", "classification")
    if name not in KINDS:
        raise unknown_name("task kind", name, KINDS)
    return KINDS[name]


__all__ = ["EvalSplit", "KINDS", "task_kind", "Classification", "QuestionAnswering"]
