"""SQuAD end to end through the CLI on a tiny BERT: train → metrics.json + predictions.json, eval, merge.

The tiny model directory holds a sequence-classification checkpoint: loading it for QA gives it a new span
head (`qa_outputs`), which every method treats as the dense task head.
"""
import json

import pytest
import torch
from transformers import AutoModelForQuestionAnswering

from diffprune.api import load_task_model
from diffprune.cli import main
from diffprune.tasks.qa_metrics import squad_scores
from qa_data import write_squad

ARGS = ["--max-length", "48", "--doc-stride", "16", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory):
    return write_squad(tmp_path_factory.mktemp("squad"), n_train=6, n_dev=3, filler=3)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_model_dir, squad_dir):
    out = tmp_path_factory.mktemp("qa") / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--task", "squad", "--data-dir", str(squad_dir), *ARGS,
                 "--output-dir", str(out), "--structured", "--epochs", "1", "--l0-epochs", "1", "--lr", "1e-3"])
    assert code == 0
    return out


def _golds(squad_dir):
    data = json.loads((squad_dir / "dev.json").read_text())
    return {qa["id"]: ([a["text"] for a in qa["answers"]], p["context"])
            for art in data["data"] for p in art["paragraphs"] for qa in p["qas"]}


def test_train_writes_em_f1_and_official_predictions(qa_run, squad_dir):
    metrics = json.loads((qa_run / "metrics.json").read_text())
    dev = metrics["final"]["dev"]
    assert metrics["main_metric"] == "f1" and dev["main"] == dev["f1"]
    assert 0.0 <= dev["exact_match"] <= dev["f1"] <= 1.0
    golds = _golds(squad_dir)
    preds = json.loads((qa_run / "predictions.json").read_text())
    assert set(preds) == set(golds)                      # every dev question, by id
    assert all(isinstance(p, str) and p in golds[q][1] for q, p in preds.items())  # spans of their context
    want = squad_scores(preds, {q: g[0] for q, g in golds.items()})
    assert dev["exact_match"] == pytest.approx(want["exact_match"]) and dev["f1"] == pytest.approx(want["f1"])
    assert json.loads((qa_run / "diff" / "diff_config.json").read_text())["extra"]["task_kind"] == "qa"


def test_eval_reproduces_the_run(qa_run, squad_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", str(qa_run), "--task", "squad", "--data-dir", str(squad_dir), "--output-dir", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())["dev"]
    want = json.loads((qa_run / "metrics.json").read_text())["final"]["dev"]
    for key in ("exact_match", "f1", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)
    assert json.loads((out / "predictions.json").read_text()) == json.loads((qa_run / "predictions.json").read_text())


def test_merged_qa_model_loads_with_plain_transformers_and_gives_the_same_logits(qa_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["merge", str(qa_run), "--output", str(merged)]) == 0
    assert "AutoModelForQuestionAnswering" in capsys.readouterr().out
    plain = AutoModelForQuestionAnswering.from_pretrained(merged).eval()
    ours, tok, _ = load_task_model(qa_run)
    batch = tok(["where does anna live?", "who bakes?"], ["anna lives in rome.", "boris is a baker in oslo."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = plain(**batch), ours(**batch)
    assert torch.allclose(a.start_logits, b.start_logits, atol=1e-5)
    assert torch.allclose(a.end_logits, b.end_logits, atol=1e-5)
    assert not torch.allclose(a.start_logits, torch.zeros_like(a.start_logits))


def test_own_squad_files_and_official_names(tiny_model_dir, tmp_path):
    data = write_squad(tmp_path / "own", n_train=3, n_dev=2, names=("train-v1.1.json", "dev-v1.1.json"))
    # the official file names in a --data-dir
    out = tmp_path / "a"
    assert main(["train", "--model", str(tiny_model_dir), "--task", "squad", "--data-dir", str(data), *ARGS,
                 "--method", "bitfit", "--epochs", "1", "--output-dir", str(out)]) == 0
    # the same files through --train-file / --dev-file give the same run
    out2 = tmp_path / "b"
    assert main(["train", "--model", str(tiny_model_dir), "--task", "squad", "--train-file",
                 str(data / "train-v1.1.json"), "--dev-file", str(data / "dev-v1.1.json"), *ARGS, "--method", "bitfit",
                 "--epochs", "1", "--output-dir", str(out2)]) == 0
    a, b = (json.loads((o / "metrics.json").read_text())["final"]["dev"] for o in (out, out2))
    assert a == pytest.approx(b)
    assert len(json.loads((out / "predictions.json").read_text())) == 2 * 6


def test_resume_restores_predictions_and_refuses_another_stride(qa_run, squad_dir, tiny_model_dir, tmp_path,
                                                                 capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(qa_run, run)
    want = (run / "predictions.json").read_text()
    (run / "metrics.json").unlink()
    (run / "predictions.json").unlink()
    base = ["train", "--model", str(tiny_model_dir), "--task", "squad", "--data-dir", str(squad_dir),
            "--output-dir", str(run), "--structured", "--epochs", "1", "--l0-epochs", "1", "--lr", "1e-3", "--resume"]
    changed = list(ARGS)
    changed[ARGS.index("--doc-stride") + 1] = "8"
    assert main([*base, *changed]) == 2
    assert "doc_stride=16" in capsys.readouterr().err and not (run / "metrics.json").exists()
    assert main([*base, *ARGS]) == 0  # every phase restored from its snapshot: nothing retrained
    assert (run / "predictions.json").read_text() == want
    assert json.loads((run / "metrics.json").read_text())["final"] == \
        json.loads((qa_run / "metrics.json").read_text())["final"]


def test_serve_refuses_a_qa_diff_before_loading(qa_run, tmp_path):
    import shutil

    pytest.importorskip("fastapi")
    from diffprune.errors import DiffpruneError
    from diffprune.serve.service import load_service

    shutil.copytree(qa_run / "diff", tmp_path / "diffs" / "squad")
    with pytest.raises(DiffpruneError, match="'qa' task diff.*classification and regression tasks only"):
        load_service(tmp_path / "diffs")
