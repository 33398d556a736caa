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


def test_serve_answers_qa_beside_classification_as_eval_does(qa_run, squad_dir, tiny_model_dir, tmp_path):
    """A folder with the QA run and a classification diff: one server, a model per task kind; concurrent
    QA clients get the answers of the run's predictions.json (what train and eval wrote), with offsets that
    point at them; a classification client beside them gets its own model's labels; bad QA inputs are their
    own request's 422."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from http_server import running_server
    from test_switch import random_diff

    from diffprune.models import load_model
    from diffprune.serve.service import load_service
    from diffprune.storage import save_diff

    root = tmp_path / "diffs"
    shutil.copytree(qa_run, root / "squad")
    base, _, _ = load_model(str(tiny_model_dir), 2)
    diff = random_diff(base, 3, labels=2)
    diff.task, diff.label_names, diff.base_model = "rte", ["entailment", "not_entailment"], str(tiny_model_dir)
    save_diff(diff, root / "rte", base)
    service = load_service(root, max_batch=3)
    assert sorted(service.groups) == ["classification", "qa"]
    golds = _golds(squad_dir)
    want = json.loads((qa_run / "predictions.json").read_text())
    rte_model, tok, _ = load_task_model(root / "rte", base_model=str(tiny_model_dir))
    with running_server(service) as url:
        listing = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]}
        assert listing["squad"]["kind"] == "qa" and listing["squad"]["fields"] == [["question"], ["context"]]
        assert listing["squad"]["max_length"] == 48 and listing["squad"]["doc_stride"] == 16

        def ask(qid):
            question = next(qa["question"] for art in json.loads((squad_dir / "dev.json").read_text())["data"]
                            for p in art["paragraphs"] for qa in p["qas"] if qa["id"] == qid)
            body = {"inputs": [{"question": question, "context": golds[qid][1]}]}
            return qid, httpx.post(f"{url}/v1/tasks/squad/predict", json=body, timeout=60)

        def classify(text):
            return text, httpx.post(f"{url}/v1/tasks/rte/predict", timeout=60,
                                    json={"inputs": [{"text": text, "text_pair": "anna lives in rome"}]})

        with ThreadPoolExecutor(6) as pool:
            qa_jobs = [pool.submit(ask, q) for q in sorted(want)]
            cls_jobs = [pool.submit(classify, t) for t in ("where is anna", "boris bakes", "clara flies")]
            for job in qa_jobs:
                qid, response = job.result()
                assert response.status_code == 200, response.text
                pred = response.json()["predictions"][0]
                assert pred["answer"] == want[qid]
                if pred["answer"]:
                    assert golds[qid][1][pred["start"]:pred["end"]] == pred["answer"]
                    assert 0.0 < pred["score"] <= 1.0
            for job in cls_jobs:
                text, response = job.result()
                enc = tok(text, "anna lives in rome", return_tensors="pt")
                with torch.no_grad():
                    probs = rte_model(**enc).logits[0].softmax(-1)
                pred = response.json()["predictions"][0]
                assert pred["label"] == ["entailment", "not_entailment"][int(probs.argmax())]
                assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        for item, words in (({"question": "who?"}, 'non-empty "context"'),
                            ({"question": "who?", "context": "   "}, 'non-empty "context"'),
                            ({"question": "who?", "context": 3}, "must be a string"),
                            ({"text": "who?"}, "unknown field"),
                            ({"question": "who " * 60, "context": "anna lives in rome."}, "context tokens per window")):
            bad = httpx.post(f"{url}/v1/tasks/squad/predict", json={"inputs": [item]}, timeout=30)
            assert bad.status_code == 422 and words in bad.json()["error"]["message"], bad.text
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
