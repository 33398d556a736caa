"""Task specs, data loading and the demo dataset.

Tiny GLUE-layout files are written into tmp_path with each real quirk (CoLA without header or final newline,
MRPC's byte-order mark, STS-B's 10 columns, RTE's unbalanced quotes) and parsed back exactly. A smoke test
loads the real shared GLUE copy when it exists (DIFFPRUNE_GLUE_DIR, default ../shared/data/glue).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest

from diffprune.errors import DiffpruneError
from diffprune.tasks import (TaskData, custom_task, demo_task, get_task, list_tasks, load_task_data,
                             write_demo_data)

GLUE_DIR = Path(os.environ.get("DIFFPRUNE_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared/data/glue"))

STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.fixture
def glue(tmp_path):
    """A GLUE-layout data dir with two or three rows per file."""
    root = tmp_path / "glue"
    write(root / "CoLA/train.tsv", "gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThe more you, the more.\n")
    write(root / "CoLA/dev.tsv", "gj04\t1\t\tThe sailors rode.\nbc01\t0\t*\tBill about himself.")  # no final \n
    mrpc_head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(root / "MRPC/train.tsv", mrpc_head + '1\t702876\t702977\the called " the witness "\tas only " the witness\n'
          "0\t2108705\t2108831\tYucaipa owned it .\tYucaipa bought it .\n", bom=True)
    write(root / "MRPC/dev.tsv", mrpc_head + "1\t1\t2\ta b .\tc d .\n", bom=True)
    write(root / "STS-B/train.tsv", STSB_HEADER
          + "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane.\t5.000\n"
          + "1\tmain-news\theadlines\t2015\t0004\tnone\tnone\tA man.\tA flute.\t3.800\n")
    write(root / "STS-B/dev.tsv", STSB_HEADER + "0\tg\tf\ty\to\ts\ts\tx y\tz w\t0.250\n")
    rte_head = "index\tsentence1\tsentence2\tlabel\n"
    write(root / "RTE/train.tsv", rte_head + '0\tHe said "no way.\tHe agreed.\tnot_entailment\n'
          '1\tA "quoted\tword" here\tentailment\n')
    write(root / "RTE/dev.tsv", rte_head + "0\tDana died.\tDana is dead.\tentailment\n")
    write(root / "SST-2/train.tsv", "sentence\tlabel\nhide new secretions \t0\nit 's charming \t1\n")
    write(root / "SST-2/dev.tsv", "sentence\tlabel\nbleak \t0\n")
    return root


# ---------------------------------------------------------------------------------------------- specs

def test_registry_has_the_nine_glue_tasks_and_aliases():
    assert sorted(list_tasks()) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "squad"])
    assert get_task("SST-2") is get_task("sst2") is get_task("Sst2")
    assert get_task("sts-b").name == "stsb"
    assert get_task("STSB").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3 and set(get_task("mnli").eval_files) == {"dev_matched", "dev_mismatched"}
    assert get_task("cola").main_metric == "mcc" and get_task("mrpc").main_metric == "f1"
    assert get_task("stsb").metrics == ("spearman", "pearson")


def test_label_orders_follow_the_hub():
    # nyu-mll/glue: rte/qnli 0 = entailment; wnli 0 = not_entailment (files use 1 = entailment);
    # mnli 0 entailment, 1 neutral, 2 contradiction.
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("wnli").label_names == ("0", "1")
    assert get_task("mnli").hub_eval_splits == {"dev_matched": "validation_matched",
                                                "dev_mismatched": "validation_mismatched"}


def test_unknown_task_suggests_the_closest():
    with pytest.raises(DiffpruneError, match=r"unknown task 'rtee'; did you mean 'rte'\?"):
        get_task("rtee")


# ----------------------------------------------------------------------------------- GLUE quirks

def test_cola_without_header_and_final_newline(glue):
    data = load_task_data(get_task("cola"), glue)
    assert isinstance(data, TaskData) and set(data.evals) == {"dev"}
    assert data.train.to_dict() == {"text_a": ["Our friends won't buy this.", "The more you, the more."],
                                    "label": [1, 0]}
    assert data.evals["dev"].to_dict() == {"text_a": ["The sailors rode.", "Bill about himself."], "label": [1, 0]}


def test_mrpc_with_bom(glue):
    data = load_task_data(get_task("mrpc"), glue)
    assert data.train.to_dict() == {
        "text_a": ['he called " the witness "', "Yucaipa owned it ."],
        "text_b": ['as only " the witness', "Yucaipa bought it ."],
        "label": [1, 0]}


def test_stsb_ten_columns_float_score(glue):
    data = load_task_data(get_task("stsb"), glue)
    assert data.train["text_a"] == ["A plane is taking off.", "A man."]
    assert data.train["text_b"] == ["An air plane.", "A flute."]
    assert data.train["label"] == pytest.approx([5.0, 3.8])
    assert data.train.features["label"].dtype == "float32"
    assert data.evals["dev"]["label"] == pytest.approx([0.25])


def test_rte_string_labels_and_unbalanced_quotes(glue):
    data = load_task_data(get_task("rte"), glue)
    assert data.train.to_dict() == {"text_a": ['He said "no way.', 'A "quoted'],
                                    "text_b": ["He agreed.", 'word" here'], "label": [1, 0]}


def test_sst2_keeps_text_verbatim_and_data_dir_may_be_the_task_folder(glue):
    a = load_task_data(get_task("sst2"), glue)
    b = load_task_data(get_task("sst2"), glue / "SST-2")
    assert a.train.to_dict() == b.train.to_dict() == {"text_a": ["hide new secretions ", "it 's charming "],
                                                      "label": [0, 1]}
    assert a.train.column_names == ["text_a", "label"]


def test_folder_name_case_is_tolerated(tmp_path):
    write(tmp_path / "rte/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    write(tmp_path / "rte/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n")
    assert load_task_data(get_task("rte"), tmp_path).evals["dev"]["label"] == [1]


def test_mnli_two_eval_splits_and_qqp_skips_short_rows(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n"
    write(tmp_path / "MNLI/train.tsv", head + "0\t1\t1\tg\tp\th\tneutral\n")
    write(tmp_path / "MNLI/dev_matched.tsv", head + "0\t1\t1\tg\tp\th\tcontradiction\n")
    write(tmp_path / "MNLI/dev_mismatched.tsv", head + "0\t1\t1\tg\tp\th\tentailment\n")
    data = load_task_data(get_task("mnli"), tmp_path)
    assert data.train["label"] == [1]
    assert {k: v["label"] for k, v in data.evals.items()} == {"dev_matched": [2], "dev_mismatched": [0]}
    qqp = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(tmp_path / "QQP/train.tsv", qqp + "0\t1\t2\tq1?\tq2?\t1\n1\t3\t4\tcut short\n2\t5\t6\ta?\tb?\t0\n")
    write(tmp_path / "QQP/dev.tsv", qqp + "0\t1\t2\tq1?\tq2?\t0\n")
    data = load_task_data(get_task("qqp"), tmp_path)
    assert data.train.to_dict() == {"text_a": ["q1?", "a?"], "text_b": ["q2?", "b?"], "label": [1, 0]}


def test_subsampling_is_seeded_random_and_deterministic(tmp_path):
    rows = "".join(f"s{i} \t{i % 2}\n" for i in range(200))
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\n" + rows)
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\n" + rows)
    spec = get_task("sst2")
    a = load_task_data(spec, tmp_path, max_train_samples=20, max_eval_samples=10, seed=3)
    b = load_task_data(spec, tmp_path, max_train_samples=20, max_eval_samples=10, seed=3)
    c = load_task_data(spec, tmp_path, max_train_samples=20, seed=4)
    assert len(a.train) == 20 and len(a.evals["dev"]) == 10 and len(c.evals["dev"]) == 200
    assert a.train["text_a"] == b.train["text_a"] != c.train["text_a"]
    assert a.train["text_a"] != [f"s{i} " for i in range(20)]  # not simply the first rows
    assert len(load_task_data(spec, tmp_path, max_train_samples=10_000).train) == 200


# -------------------------------------------------------------------------------------- custom tasks

def test_custom_csv_tsv_jsonl(tmp_path):
    csv_train = write(tmp_path / "train.csv", 'text,label\n"hello, world",pos\nbye,neg\n"say ""hi""",pos\n')
    csv_dev = write(tmp_path / "dev.csv", "text,label\nyo,neg\n")
    spec = custom_task(csv_train, csv_dev, ["text"], "label")
    assert spec.label_names == ("neg", "pos") and spec.main_metric == "accuracy"
    assert spec.metrics == ("accuracy", "macro_f1") and spec.hub is None
    data = load_task_data(spec)
    assert data.train.to_dict() == {"text_a": ["hello, world", "bye", 'say "hi"'], "label": [1, 0, 1]}
    assert data.evals["dev"]["label"] == [0]

    tsv = write(tmp_path / "t.tsv", "a\tb\ty\nx\ty\t2\nu\tv\t10\nw\tz\t2\n")
    spec = custom_task(tsv, {"val": tsv, "test": tsv}, ["a", "b"], "y")
    assert spec.label_names == ("2", "10")  # numeric labels sort as numbers
    data = load_task_data(spec)
    assert set(data.evals) == {"val", "test"} and data.train["label"] == [0, 1, 0]
    assert data.train["text_b"] == ["y", "v", "z"]

    jl = write(tmp_path / "r.jsonl", "\n".join(json.dumps(r) for r in
                                            [{"q": "a", "score": 1.5}, {"q": "b", "score": 0}]) + "\n")
    spec = custom_task(jl, jl, ["q"], "score", regression=True)
    assert spec.is_regression and spec.main_metric == "spearman"
    assert load_task_data(spec).train["label"] == pytest.approx([1.5, 0.0])


def test_custom_task_errors(tmp_path):
    f = write(tmp_path / "t.tsv", "text\tlabel\na\t1\nb\t1\n")
    with pytest.raises(DiffpruneError, match="at least 2"):
        custom_task(f, f, ["text"], "label")
    with pytest.raises(DiffpruneError, match="not found: .*nope.tsv"):
        custom_task(tmp_path / "nope.tsv", f, ["text"], "label")
    with pytest.raises(DiffpruneError, match="column 'lbl' not found .*available: text, label"):
        custom_task(f, f, ["text"], "lbl")
    with pytest.raises(DiffpruneError, match="unsupported data file type '.xlsx'"):
        custom_task(write(tmp_path / "t.xlsx", "x"), f, ["text"], "label")
    with pytest.raises(DiffpruneError, match="give an evaluation file"):
        custom_task(f, None, ["text"], "label")
    with pytest.raises(DiffpruneError, match="1 or 2 text columns"):
        custom_task(f, f, ["a", "b", "c"], "label", label_names=["0", "1"])


# ------------------------------------------------------------------------------------------- errors

def test_error_missing_data_dir(tmp_path):
    with pytest.raises(DiffpruneError, match="data directory not found: .*nowhere"):
        load_task_data(get_task("rte"), tmp_path / "nowhere")


def test_error_missing_files(glue):
    with pytest.raises(DiffpruneError, match=r"data file not found: .*QNLI.train\.tsv"):
        load_task_data(get_task("qnli"), glue)
    (glue / "RTE/dev.tsv").unlink()
    with pytest.raises(DiffpruneError, match=r"data file not found: .*RTE.dev\.tsv"):
        load_task_data(get_task("rte"), glue)


def test_error_missing_column(tmp_path):
    write(tmp_path / "RTE/train.tsv", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DiffpruneError, match="column 'sentence1' not found .*available: index, premise, hypothesis, label"):
        load_task_data(get_task("rte"), tmp_path)


def test_error_bad_label_names_value_file_line(tmp_path):
    write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tneutral\n")
    with pytest.raises(DiffpruneError, match=r"label 'neutral' at .*RTE.train\.tsv:3 .*entailment, not_entailment"):
        load_task_data(get_task("rte"), tmp_path)
    write(tmp_path / "STS-B/train.tsv", STSB_HEADER + "0\tg\tf\ty\to\ts\ts\tx\tz\thigh\n")
    with pytest.raises(DiffpruneError, match=r"label 'high' at .*train\.tsv:2 is not a number"):
        load_task_data(get_task("stsb"), tmp_path)


def test_error_wrong_column_count_names_file_and_line(tmp_path):
    write(tmp_path / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tc\tentailment\n")
    with pytest.raises(DiffpruneError, match=r"train\.tsv:3 has 5 columns but expected 4"):
        load_task_data(get_task("rte"), tmp_path)


def test_error_empty_split(glue):
    write(glue / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(DiffpruneError, match="split 'dev' of task 'rte' is empty"):
        load_task_data(get_task("rte"), glue)


def test_error_bad_sample_limit(glue):
    with pytest.raises(DiffpruneError, match="max_train_samples must be a positive integer"):
        load_task_data(get_task("rte"), glue, max_train_samples=0)


# ---------------------------------------------------------------------------------------------- hub

def test_hub_failure_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DiffpruneError) as err:
        load_task_data(get_task("rte"))
    msg = str(err.value)
    assert "could not load 'rte' from the hub" in msg and "--data-dir" in msg and "\n" not in msg


def test_hub_columns_are_renamed_to_the_common_schema(monkeypatch):
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"premise": ["p1", "p2", "p3"], "hypothesis": ["h1", "h2", "h3"],
                                             "label": [0, 2, 1], "idx": [0, 1, 2]}),
        "validation_matched": datasets.Dataset.from_dict({"premise": ["m"], "hypothesis": ["n"], "label": [1],
                                                          "idx": [0]}),
        "validation_mismatched": datasets.Dataset.from_dict({"premise": ["x"], "hypothesis": ["y"],
                                                             "label": [0], "idx": [0]}),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    data = load_task_data(get_task("mnli"), max_train_samples=2, seed=0)
    assert data.train.column_names == ["text_a", "text_b", "label"] and len(data.train) == 2
    assert data.evals["dev_mismatched"].to_dict() == {"text_a": ["x"], "text_b": ["y"], "label": [0]}


# ------------------------------------------------------------------------------------ real GLUE copy

@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"no shared GLUE copy at {GLUE_DIR}")
@pytest.mark.parametrize("task,n_train,n_dev,train_counts,dev_counts", [
    ("sst2", 67349, 872, {0: 29780, 1: 37569}, {0: 428, 1: 444}),
    ("cola", 8551, 1043, {0: 2528, 1: 6023}, {0: 322, 1: 721}),
    ("mrpc", 3668, 408, {0: 1194, 1: 2474}, {0: 129, 1: 279}),
    ("stsb", 5749, 1500, None, None),
    ("rte", 2490, 277, {0: 1249, 1: 1241}, {0: 146, 1: 131}),
])
def test_real_glue_counts(task, n_train, n_dev, train_counts, dev_counts):
    data = load_task_data(get_task(task), GLUE_DIR)
    assert (len(data.train), len(data.evals["dev"])) == (n_train, n_dev)
    if train_counts is None:
        assert 0.0 <= min(data.train["label"]) and max(data.train["label"]) <= 5.0
    else:
        assert dict(Counter(data.train["label"])) == train_counts
        assert dict(Counter(data.evals["dev"]["label"])) == dev_counts


# ------------------------------------------------------------------------------------------- demo

def test_demo_data_is_deterministic_balanced_and_disjoint(tmp_path):
    a = write_demo_data(tmp_path / "a")
    b = write_demo_data(tmp_path / "b")
    for name in ("train.tsv", "dev.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    data = load_task_data(demo_task(a))
    train, dev = data.train, data.evals["dev"]
    assert (len(train), len(dev)) == (1000, 200)
    assert not set(train["text_a"]) & set(dev["text_a"])
    assert len(set(train["text_a"])) == 1000
    for split in (train, dev):
        assert 0.45 <= sum(split["label"]) / len(split) <= 0.55
    same = load_task_data(custom_task(a / "train.tsv", a / "dev.tsv", ["sentence"], "label"))
    assert same.train.to_dict() == train.to_dict()


def test_demo_data_is_not_bag_of_words_separable(tmp_path):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    data = load_task_data(demo_task(write_demo_data(tmp_path)))
    vec = CountVectorizer(token_pattern=r"[^ ]+")
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(data.train["text_a"]), data.train["label"])
    acc = clf.score(vec.transform(data.evals["dev"]["text_a"]), data.evals["dev"]["label"])
    assert 0.55 < acc < 0.85, acc  # above chance, but negation and contrast defeat a unigram model


def test_specs_are_hashable_and_immutable():
    spec = get_task("rte")
    assert {spec: 1}[get_task("RTE")] == 1
    with pytest.raises(Exception):
        spec.name = "other"
