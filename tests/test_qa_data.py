"""Reading SQuAD-format data: the official layout and names, a `squad` subfolder, the hub's schema, subsets."""
import json

import datasets
import pytest

from diffprune.tasks import get_task, load_task_data
from diffprune.tasks import qa as qa_module
from qa_data import write_squad


def _flat(path):
    data = json.loads(path.read_text())
    return [(qa["id"], qa["question"], p["context"], [a["text"] for a in qa["answers"]],
             [a["answer_start"] for a in qa["answers"]]) for art in data["data"] for p in art["paragraphs"]
            for qa in p["qas"]]


def _rows(ds):
    return [(r["id"], r["question"], r["context"], r["answer_texts"], r["answer_starts"]) for r in ds]


def test_our_names_official_names_and_a_squad_subfolder_read_the_same(tmp_path):
    spec = get_task("squad")
    ours = write_squad(tmp_path / "a", n_train=2, n_dev=1)
    official = write_squad(tmp_path / "b", n_train=2, n_dev=1, names=("train-v1.1.json", "dev-v1.1.json"))
    nested = write_squad(tmp_path / "c" / "squad", n_train=2, n_dev=1)
    want_train, want_dev = _flat(ours / "train.json"), _flat(ours / "dev.json")
    for folder in (ours, official, nested.parent):
        data = load_task_data(spec, folder)
        assert _rows(data.train) == want_train and _rows(data.evals["dev"]) == want_dev
        assert list(data.evals) == ["dev"]


def test_subsets_are_seeded_and_keep_the_order(tmp_path):
    folder = write_squad(tmp_path, n_train=4, n_dev=2)
    spec = get_task("squad")
    a = load_task_data(spec, folder, max_train_samples=5, max_eval_samples=3, seed=1)
    b = load_task_data(spec, folder, max_train_samples=5, max_eval_samples=3, seed=1)
    assert _rows(a.train) == _rows(b.train) and len(a.train) == 5 and len(a.evals["dev"]) == 3
    ids = [r[0] for r in _flat(folder / "train.json")]
    picked = [ids.index(i) for i in a.train["id"]]
    assert picked == sorted(picked)


def test_the_hub_schema_is_read_into_the_same_rows(tmp_path, monkeypatch):
    folder = write_squad(tmp_path, n_train=2, n_dev=1)

    def hub_split(path):
        rows = _flat(path)
        return datasets.Dataset.from_dict({
            "id": [r[0] for r in rows], "title": ["people"] * len(rows), "context": [r[2] for r in rows],
            "question": [r[1] for r in rows],
            "answers": [{"text": r[3], "answer_start": r[4]} for r in rows]})

    fake = datasets.DatasetDict({"train": hub_split(folder / "train.json"),
                                 "validation": hub_split(folder / "dev.json")})
    calls = []
    monkeypatch.setattr(qa_module.datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    data = load_task_data(get_task("squad"))
    assert calls == [("rajpurkar/squad",)]
    assert _rows(data.train) == _flat(folder / "train.json")
    assert _rows(data.evals["dev"]) == _flat(folder / "dev.json")


def test_hub_unreachable_is_one_clear_error(monkeypatch):
    from diffprune.errors import DiffpruneError

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(qa_module.datasets, "load_dataset", offline)
    with pytest.raises(DiffpruneError, match="could not load 'squad' from the hub.*--data-dir"):
        load_task_data(get_task("squad"))
