"""Issue 16's bad SQuAD input: one `diffprune: error:` line naming the problem, exit status 2, nothing written.

Rows as in test_bad_input.py: (name, setup, words the error line must hold); a setup writes its files under
tmp_path and returns the argv and the paths that must not exist afterwards.
"""
import json

import pytest

from diffprune.cli import main
from qa_data import paragraph, squad_json, write_squad
from run_inputs import data_dir, trained  # noqa: F401  (fixtures)


def _train(model, data, out, *extra):
    return ["train", "--model", str(model), "--task", "squad", "--data-dir", str(data), "--output-dir", str(out),
            "--max-length", "48", "--doc-stride", "16", "--epochs", "1", "--no-progress", "--method", "bitfit", *extra]


def _edit_train(edit):
    def setup(tmp, model, trained_run):
        data = write_squad(tmp / "data", n_train=2, n_dev=1)
        obj = json.loads((data / "train.json").read_text())
        edit(obj)
        (data / "train.json").write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
        return _train(model, data, tmp / "o"), [tmp / "o"]
    return setup


def _first_qa(obj):
    return obj["data"][0]["paragraphs"][0]["qas"][0]


def not_json(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1)
    (data / "train.json").write_text("sentence\tlabel\nthe film was good\t1\n")
    return _train(model, data, tmp / "o"), [tmp / "o"]


def long_context_no_stride(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1, filler=8)
    return _train(model, data, tmp / "o", "--doc-stride", "0"), [tmp / "o"]


def empty_dev(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1)
    (data / "dev.json").write_text(json.dumps(squad_json([])))
    return _train(model, data, tmp / "o"), [tmp / "o"]


def stride_too_large(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1)
    return _train(model, data, tmp / "o", "--doc-stride", "40"), [tmp / "o"]


def classification_diff_on_squad(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1)
    return ["eval", str(trained_run), "--task", "squad", "--data-dir", str(data), "--output-dir", str(tmp / "ev")], \
        [tmp / "ev"]


def negative_stride(tmp, model, trained_run):
    data = write_squad(tmp / "data", n_train=2, n_dev=1)
    return _train(model, data, tmp / "o", "--doc-stride", "-1"), [tmp / "o"]


CASES = [
    ("not_json", not_json, ["train.json", "not SQuAD JSON", "line 1"]),
    ("json_but_not_squad", _edit_train(lambda o: o.pop("data")), ["train.json", "not SQuAD JSON", '"data"']),
    ("paragraph_without_context", _edit_train(lambda o: o["data"][0]["paragraphs"][0].pop("context")),
     ["not SQuAD JSON", "paragraph 0", '"context"']),
    ("question_without_answers", _edit_train(lambda o: _first_qa(o).update(answers=[])),
     ["question q0-0c has no answers"]),
    ("answer_start_off", _edit_train(lambda o: _first_qa(o)["answers"][0].update(answer_start=1)),
     ["question q0-0c", "answer_start 1", "does not point at its answer"]),
    ("duplicate_id", _edit_train(lambda o: o["data"][0]["paragraphs"].append(paragraph(0))),
     ["q0-0c", "twice"]),
    ("long_context_no_stride", long_context_no_stride, ["question q0-0c", "--doc-stride 0"]),
    ("empty_dev_set", empty_dev, ["split 'dev'", "empty"]),
    ("stride_leaves_no_room", stride_too_large, ["--doc-stride 40", "--max-length 48"]),
    ("negative_stride", negative_stride, ["--doc-stride", "-1"]),
    ("classification_diff_on_squad", classification_diff_on_squad, ["classification diff", "question-answering"]),
]


@pytest.mark.parametrize("name,setup,words", CASES, ids=[c[0] for c in CASES])
def test_bad_squad_input_is_one_line_and_writes_nothing(name, setup, words, tmp_path, tiny_model_dir, trained,
                                                          capsys):
    args, absent = setup(tmp_path, tiny_model_dir, trained)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("diffprune: error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    for path in absent:
        assert not path.exists(), f"{path} was written"
