"""What a served task reads and answers, per task kind: the request items it accepts and how a batch of them
becomes predictions. `Service` picks one of these for each task diff (`inputs_for`) and never branches on
the kind itself.

* `TextInputs` (classification and regression): `{"text": …, "text_pair": …}` (or the task's own column
  names) → `{"label", "score", "scores"}` or `{"value"}`. Tokenised as `diffprune eval` tokenises dev data
  (`train.data.encode_texts`), so a served prediction is the one evaluation computes, up to float rounding
  from the batch's padding length.
* `SpanInputs` (extractive QA): `{"question": …, "context": …}` → `{"answer", "start", "end", "score"}`:
  the context is cut into the windows the diff was trained with (its max length and doc stride,
  `tasks.qa_features.encode_windows`) and the answer is the span `diffprune eval` would pick
  (`best_spans`); `start` / `end` are character offsets into the context, `score` the probability of that
  start times that end within its window. Checks that need the tokenizer (a question too long to leave
  room for context) run when the request is parsed, so a bad input is its own request's 422 and never fails
  a batch shared with other clients.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffpruneError
from ..storage.format import TaskDiff


class RequestError(Exception):
    """A bad request: HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _text_field(item: dict, i: int, names: tuple[str, ...]) -> str | None:
    given = [k for k in names if k in item]
    if len(given) > 1:
        raise RequestError(422, f"inputs[{i}] gives {' and '.join(given)}, which name the same text")
    if not given:
        return None
    value = item[given[0]]
    if not isinstance(value, str):
        raise RequestError(422, f"inputs[{i}].{given[0]} must be a string, got {type(value).__name__}")
    return value


def _check_known(item, i: int, known: set[str], task: str, reads: str) -> None:
    if not isinstance(item, dict):
        raise RequestError(422, f"inputs[{i}] must be an object like {{{reads}}}")
    unknown = sorted(set(item) - known)
    if unknown:
        raise RequestError(422, f"inputs[{i}] has unknown field(s) {unknown}; task '{task}' reads {reads}")


def _forward(model, batch: dict) -> object:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(**{k: v.to(device) for k, v in batch.items()})


class TextInputs:
    """One text or a text pair per input, classified or scored."""

    example = '{"text": "..."}'

    def __init__(self, diff: TaskDiff, tokenizer, max_length: int):
        self.labels, self.tokenizer, self.max_length = diff.label_names, tokenizer, max_length
        self.num_texts, aliases = task_inputs(diff)
        self.names = (("text", *(aliases[0] if aliases else ())),
                      ("text_pair", *(aliases[1] if len(aliases) > 1 else ())))

    def describe(self) -> dict:
        fields = [list(n) for n in self.names]
        return {"labels": self.labels, "regression": self.labels is None, "num_texts": self.num_texts,
                "fields": fields[: self.num_texts] if self.num_texts else fields}

    def parse(self, item, i: int, task: str) -> tuple[str, str | None]:
        _check_known(item, i, set(self.names[0]) | set(self.names[1]), task,
                     f"{' / '.join(self.names[0])} and {' / '.join(self.names[1])}")
        text, pair = (_text_field(item, i, names) for names in self.names)
        if text is None:
            raise RequestError(422, f"inputs[{i}] has no \"text\" field (task '{task}' reads "
                                    f"{' / '.join(self.names[0])})")
        if self.num_texts == 2 and pair is None:
            raise RequestError(422, f"inputs[{i}]: task '{task}' classifies text pairs; give "
                                    f"\"text_pair\" too ({' / '.join(self.names[1])})")
        if self.num_texts == 1 and pair is not None:
            raise RequestError(422, f"inputs[{i}]: task '{task}' takes a single text; drop \"text_pair\"")
        return text, pair

    def predict(self, model, items: list, max_batch: int) -> list[dict]:
        from ..train.data import encode_texts

        out: list[dict] = []
        for start in range(0, len(items), max_batch):
            features = []
            for a, b in items[start:start + max_batch]:
                enc = encode_texts(self.tokenizer, self.max_length, [a], None if b is None else [b])
                features.append({k: v[0] for k, v in enc.items()})
            logits = _forward(model, self.tokenizer.pad(features, return_tensors="pt")).logits.float().cpu()
            out.extend(label_predictions(logits, self.labels))
        return out


def label_predictions(logits: torch.Tensor, labels: list[str] | None) -> list[dict]:
    """Classification: the top label, its probability and every label's; regression: the value."""
    if labels is None:
        return [{"value": float(v)} for v in logits[:, 0]]
    out = []
    for row in logits.softmax(-1):
        top = int(row.argmax())
        out.append({"label": labels[top], "score": float(row[top]),
                    "scores": {label: float(p) for label, p in zip(labels, row)}})
    return out


class SpanInputs:
    """A question and a context per input; the answer is a span of the context."""

    names = ("question", "context")
    example = '{"question": "...", "context": "..."}'

    def __init__(self, diff: TaskDiff, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.doc_stride = int(diff.extra.get("doc_stride", 128))
        if not getattr(tokenizer, "is_fast", False):
            raise DiffpruneError("serving a question-answering diff needs the base model's fast tokenizer "
                                 "(answers are mapped through its offset mapping); this one is slow")

    def describe(self) -> dict:
        return {"labels": None, "regression": False, "num_texts": 2, "fields": [["question"], ["context"]],
                "doc_stride": self.doc_stride,
                "answers": "a span of the context: answer, start / end character offsets, score"}

    def parse(self, item, i: int, task: str) -> tuple[str, str]:
        from ..tasks.qa_features import check_room

        _check_known(item, i, set(self.names), task, '"question": "...", "context": "..."')
        question, context = (_text_field(item, i, (n,)) for n in self.names)
        for name, value in zip(self.names, (question, context)):
            if value is None or not value.strip():
                raise RequestError(422, f"inputs[{i}] needs a non-empty \"{name}\" (task '{task}' answers a "
                                        "question from a context)")
        try:
            check_room(self.tokenizer, [f"inputs[{i}]"], [question.lstrip()], self.max_length, self.doc_stride)
            if self.doc_stride == 0:  # no windows: the pair must fit
                self._windows([question], [context], [f"inputs[{i}]"])
        except DiffpruneError as exc:
            raise RequestError(422, str(exc).replace("--max-length", "the task's max length").replace(
                "--doc-stride", "doc stride")) from None
        return question, context

    def _windows(self, questions, contexts, ids):
        from ..tasks.qa_features import encode_windows

        return encode_windows(self.tokenizer, ids, questions, contexts, None, None, self.max_length, self.doc_stride)

    def predict(self, model, items: list, max_batch: int) -> list[dict]:
        from ..tasks.qa_features import best_spans, span_chars

        questions, contexts = [q for q, _ in items], [c for _, c in items]
        windows = self._windows(questions, contexts, [f"inputs[{k}]" for k in range(len(items))])
        width = max(len(o) for o in windows.offsets)
        start = np.full((len(windows), width), -np.inf, dtype=np.float32)
        end = start.copy()
        for a in range(0, len(windows), max_batch):
            rows = range(a, min(a + max_batch, len(windows)))
            features = [{k: v[w] for k, v in windows.inputs.items()} for w in rows]
            out = _forward(model, self.tokenizer.pad(features, return_tensors="pt"))
            for r, w in enumerate(rows):
                n = len(windows.offsets[w])
                start[w, :n] = out.start_logits[r, :n].float().cpu().numpy()
                end[w, :n] = out.end_logits[r, :n].float().cpu().numpy()
        answers = []
        for context, span in zip(contexts, best_spans(start, end, windows, len(items))):
            if span is None:
                answers.append({"answer": "", "start": None, "end": None, "score": 0.0})
                continue
            _, w, i, j = span
            a, b = span_chars(windows, span)
            n = len(windows.offsets[w])
            p_start = torch.from_numpy(start[w, :n]).softmax(-1)[i]
            p_end = torch.from_numpy(end[w, :n]).softmax(-1)[j]
            answers.append({"answer": context[a:b], "start": a, "end": b, "score": float(p_start * p_end)})
        return answers


def task_inputs(diff: TaskDiff) -> tuple[int | None, tuple[tuple[str, ...], ...]]:
    """(number of texts, extra field names per text) from the diff's task when it is a GLUE task."""
    from ..tasks import get_task

    try:
        spec = get_task(diff.task)
    except DiffpruneError:
        return None, ()
    columns = [tuple(dict.fromkeys(c for c in cols if isinstance(c, str) and c not in ("text", "text_pair")))
               for cols in zip(spec.hub_text_columns, spec.text_columns)] if spec.hub_text_columns else []
    return len(spec.text_columns), tuple(columns)


INPUTS = {"classification": TextInputs, "qa": SpanInputs}


def inputs_for(kind: str, diff: TaskDiff, tokenizer, max_length: int):
    """The inputs plug-in of a diff's task kind (`load_service` refuses other kinds before loading)."""
    return INPUTS[kind](diff, tokenizer, max_length)
