"""SQuAD-format extractive question answering: reading and checking the data.

`load_squad(spec, data_dir, …)` returns a `TaskData` whose splits have one row per question with the
columns id, title, question, context, answer_texts and answer_starts (character offsets into the context),
from any of:

* a folder in the official layout: `train.json` / `dev.json`, or the official names `train-v1.1.json` /
  `dev-v1.1.json` (`--data-dir`, which may also be the folder holding a `squad` folder);
* the user's own SQuAD-format files (`--train-file` / `--dev-file`, absolute paths in the spec);
* the hub's `rajpurkar/squad` through `datasets` when neither is given.

Every answer is checked against its context before anything is tokenized (`answer_start` must point at
the answer text: a wrong offset would silently train the model on the wrong span), and every mistake is
one `DiffpruneError` naming the file and the question id. Questions without answers (SQuAD 2.0's
unanswerable ones) are refused: v1.1's model always answers, and such a question cannot be scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets

from diffprune.errors import DiffpruneError
from diffprune.tasks.loading import TaskData, _check_limit, _subsample_indices
from diffprune.tasks.specs import TaskSpec

COLUMNS = ("id", "title", "question", "context", "answer_texts", "answer_starts")
# our split file name -> the official name tried when it is missing
OFFICIAL_NAMES = {"train.json": "train-v1.1.json", "dev.json": "dev-v1.1.json"}
LAYOUT = ('{"version": "1.1", "data": [{"title": …, "paragraphs": [{"context": …, "qas": [{"id": …, '
          '"question": …, "answers": [{"text": …, "answer_start": …}]}]}]}]}')


def features() -> datasets.Features:
    return datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"),
        "question": datasets.Value("string"), "context": datasets.Value("string"),
        "answer_texts": datasets.Sequence(datasets.Value("string")),
        "answer_starts": datasets.Sequence(datasets.Value("int64")),
    })


def _not_squad(path, why: str) -> DiffpruneError:
    return DiffpruneError(f"{path} is not SQuAD JSON ({why}; expected {LAYOUT})")


def _need(value, kind: type, path, where: str, what: str):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _not_squad(path, f"{where}: {what} should be a {'list' if kind is list else kind.__name__}, got "
                               f"{type(value).__name__}")
    return value


def parse_squad(obj, path) -> list[dict]:
    """The questions of a parsed SQuAD JSON object as flat records (checked for layout, not answers)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise _not_squad(path, "no top-level \"data\" list")
    records = []
    for a, article in enumerate(obj["data"]):
        where = f"article {a}"
        _need(article, dict, path, where, "the article")
        title = article.get("title", "")
        for p, para in enumerate(_need(article.get("paragraphs"), list, path, where, '"paragraphs"')):
            pwhere = f"{where} paragraph {p}"
            _need(para, dict, path, pwhere, "the paragraph")
            context = _need(para.get("context"), str, path, pwhere, '"context"')
            for q, qa in enumerate(_need(para.get("qas"), list, path, pwhere, '"qas"')):
                qwhere = f"{pwhere} question {q}"
                _need(qa, dict, path, qwhere, "the question")
                qid = qa.get("id")
                if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                    raise _not_squad(path, f"{qwhere}: no \"id\"")
                qwhere = f"question {qid}"
                question = _need(qa.get("question"), str, path, qwhere, '"question"')
                answers = _need(qa.get("answers", []), list, path, qwhere, '"answers"')
                texts, starts = [], []
                for ans in answers:
                    _need(ans, dict, path, qwhere, "an answer")
                    texts.append(_need(ans.get("text"), str, path, qwhere, 'an answer\'s "text"'))
                    starts.append(_need(ans.get("answer_start"), int, path, qwhere, 'an answer\'s "answer_start"'))
                if qa.get("is_impossible"):
                    texts, starts = [], []
                records.append({"id": str(qid), "title": str(title), "question": question, "context": context,
                                "answer_texts": texts, "answer_starts": starts})
    return records


def check_records(records: list[dict], path, split: str, task: str) -> None:
    """Every question has an answer, every answer_start points at its text, ids are unique, the split is not
    empty. `path` names the source in the messages."""
    if not records:
        raise DiffpruneError(f"split '{split}' of task '{task}' is empty ({path}: no questions)")
    seen = set()
    for r in records:
        qid = r["id"]
        if qid in seen:
            raise DiffpruneError(f"{path}: question id {qid} occurs twice; ids must be unique")
        seen.add(qid)
        if not r["answer_texts"]:
            raise DiffpruneError(f"{path}: question {qid} has no answers; every question of a {split} file needs "
                                 "one (SQuAD 2.0's unanswerable questions are not supported)")
        context = r["context"]
        for text, start in zip(r["answer_texts"], r["answer_starts"]):
            if not text.strip():
                raise DiffpruneError(f"{path}: question {qid} has an empty answer text")
            if start < 0 or context[start:start + len(text)] != text:
                found = context[max(0, start):max(0, start) + len(text)]
                raise DiffpruneError(f"{path}: question {qid}: answer_start {start} does not point at its answer "
                                     f"text {text!r} in the context (there it reads {found!r})")


def read_squad_file(path: Path, split: str, task: str) -> list[dict]:
    if not path.is_file():
        raise DiffpruneError(f"data file not found: {path} (split '{split}' of task '{task}')")
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise _not_squad(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _not_squad(path, f"line {exc.lineno}: {exc.msg}") from None
    records = parse_squad(obj, path)
    check_records(records, path, split, task)
    return records


def squad_dir(spec: TaskSpec, data_dir) -> Path:
    """The folder holding the split files: data_dir itself, or its `squad` folder (any case)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DiffpruneError(f"data directory not found: {root}")
    if not (root / spec.train_file).is_file() and not (root / OFFICIAL_NAMES.get(spec.train_file, "")).is_file():
        for child in sorted(root.iterdir()):
            if child.is_dir() and child.name.lower() == (spec.local_dir or spec.name).lower():
                return child
    return root


def split_file(base: Path, name: str) -> Path:
    """base/name, or the official name for it when only that exists."""
    path = base / name
    official = OFFICIAL_NAMES.get(Path(name).name)
    if not path.is_file() and official and (base / official).is_file():
        return base / official
    return path


def _dataset(records: list[dict], limit, seed) -> datasets.Dataset:
    idx = _subsample_indices(len(records), limit, seed)
    if idx is not None:
        records = [records[i] for i in idx]
    return datasets.Dataset.from_dict({c: [r[c] for r in records] for c in COLUMNS}, features=features())


def _from_hub(spec: TaskSpec) -> dict[str, list[dict]]:
    try:
        raw = datasets.load_dataset(*[h for h in spec.hub if h])
    except Exception as e:  # offline, hub down: one clear line with the way out
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DiffpruneError(f"could not load '{spec.name}' from the hub ({reason}); pass --data-dir with a "
                             "folder holding train.json and dev.json (or train-v1.1.json / dev-v1.1.json)") from None
    out = {}
    for split, hub_split in {"train": "train", **spec.hub_eval_splits}.items():
        if hub_split not in raw:
            raise DiffpruneError(f"hub dataset {spec.hub[0]} has no split '{hub_split}' (has: {', '.join(raw)})")
        out[split] = [{"id": str(r["id"]), "title": r.get("title", ""), "question": r["question"],
                       "context": r["context"], "answer_texts": list(r["answers"]["text"]),
                       "answer_starts": list(r["answers"]["answer_start"])} for r in raw[hub_split]]
        check_records(out[split], f"{spec.hub[0]}[{hub_split}]", split, spec.name)
    return out


def load_squad(spec: TaskSpec, data_dir=None, max_train_samples=None, max_eval_samples=None,
               seed: int = 0) -> TaskData:
    """A QA task's splits (one row per question); see the module docstring for the sources."""
    _check_limit("max_train_samples", max_train_samples)
    _check_limit("max_eval_samples", max_eval_samples)
    files = {"train": spec.train_file, **spec.eval_files}
    if data_dir is None and spec.hub is not None and not Path(spec.train_file).is_absolute():
        records = _from_hub(spec)
    else:
        base = squad_dir(spec, data_dir) if data_dir is not None else Path()
        records = {split: read_squad_file(split_file(base, name), split, spec.name) for split, name in files.items()}
    train = _dataset(records.pop("train"), max_train_samples, seed)
    return TaskData(spec, train, {s: _dataset(r, max_eval_samples, seed) for s, r in records.items()})


def squad_files(spec: TaskSpec, train_file, dev_file) -> TaskSpec:
    """`spec` reading the user's own SQuAD-format files instead of its folder or hub copy."""
    import dataclasses

    paths = [Path(p).expanduser().resolve() for p in (train_file, dev_file)]
    for p in paths:
        if not p.is_file():
            raise DiffpruneError(f"data file not found: {p}")
    return dataclasses.replace(spec, train_file=str(paths[0]), eval_files={"dev": str(paths[1])}, hub=None)


__all__ = ["load_squad", "parse_squad", "check_records", "read_squad_file", "squad_files", "COLUMNS", "features"]
