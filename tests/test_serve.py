"""`diffprune serve` against a real uvicorn server on 127.0.0.1, through a real HTTP client (httpx).

The answers are checked against what is computed independently: each task's model loaded on its own with
`load_task_model` (a fresh base + apply_diff), run on each input alone; and, for a run trained by the CLI,
the dev accuracy its metrics.json recorded.
"""
from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from http_server import running_server
from run_inputs import data_dir, src_path, trained  # noqa: F401  (fixtures)
from test_switch import random_diff

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from diffprune.api import load_task_model  # noqa: E402
from diffprune.cli import main  # noqa: E402
from diffprune.models import load_model  # noqa: E402
from diffprune.serve import load_service  # noqa: E402
from diffprune.storage import save_diff  # noqa: E402
from diffprune.errors import DiffpruneError  # noqa: E402

WORDS = "the a movie was good bad not at all great boring film plot actor a man is sleeping nobody sleeps".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))


@pytest.fixture(scope="module")
def diffs_root(tmp_path_factory, tiny_model_dir, trained):  # noqa: F811
    """rte (pairs, 2 labels), mnli (pairs, 3 labels), stsb (pairs, regression): random diffs over the tiny
    base saved with its fingerprint; toy: a run trained by the CLI (single text)."""
    root = tmp_path_factory.mktemp("diffs")
    base, _, _ = load_model(str(tiny_model_dir), 2)
    for seed, (name, labels) in enumerate((("rte", ["entailment", "not_entailment"]),
                                           ("mnli", ["entailment", "neutral", "contradiction"]),
                                           ("stsb", None)), start=1):
        diff = random_diff(base, seed, labels=len(labels) if labels else None)
        diff.task, diff.label_names, diff.base_model = name, labels, str(tiny_model_dir)
        diff.extra["max_length"] = 16
        save_diff(diff, root / name, base)
    shutil.copytree(trained, root / "toy")
    (root / "notes").mkdir()  # folders without a diff are skipped
    return root


@pytest.fixture(scope="module")
def server(diffs_root, tiny_model_dir):
    service = load_service(diffs_root, str(tiny_model_dir), max_batch=4, max_inputs=8, max_body_bytes=4096)
    with running_server(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def reference(diffs_root, tiny_model_dir):
    """Per task: predictions of its own model (fresh base + apply_diff), one input at a time."""
    models = {}

    def predict(name: str, text: str, pair: str | None):
        if name not in models:
            models[name] = load_task_model(diffs_root / name, base_model=str(tiny_model_dir))
        model, tok, diff = models[name]
        enc = tok(text, pair, truncation=True, max_length=diff.extra["max_length"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        return diff.label_names, logits

    return predict


def check(pred: dict, labels, logits) -> None:
    if labels is None:
        assert pred["value"] == pytest.approx(float(logits[0]), abs=1e-5)
        return
    probs = logits.softmax(-1)
    assert pred["label"] == labels[int(probs.argmax())]
    assert list(pred["scores"]) == labels
    for label, p in zip(labels, probs):
        assert pred["scores"][label] == pytest.approx(float(p), abs=1e-5)
    assert pred["score"] == pred["scores"][pred["label"]]


def test_concurrent_clients_on_different_tasks_get_their_tasks_answers(server, reference):
    url, service = server
    rng = random.Random(0)
    requests = []
    for i in range(32):
        name = ("rte", "mnli", "stsb", "toy")[i % 4]
        inputs = [{"text": sentence(rng)} if name == "toy" else {"text": sentence(rng), "text_pair": sentence(rng)}
                  for _ in range(rng.randint(1, 6))]
        requests.append((name, inputs))
    before = dict(service.counters)

    def send(item):
        name, inputs = item
        response = httpx.post(f"{url}/v1/tasks/{name}/predict", json={"inputs": inputs}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests))
    for (name, inputs), answer in zip(requests, answers):
        assert answer["task"] == name and len(answer["predictions"]) == len(inputs)
        for item, pred in zip(inputs, answer["predictions"]):
            check(pred, *reference(name, item["text"], item.get("text_pair")))
    batches = service.counters["batches"] - before["batches"]
    switches = service.counters["switches"] - before["switches"]
    assert service.counters["inputs"] - before["inputs"] == sum(len(i) for _, i in requests)
    assert 0 < switches <= batches <= len(requests)  # one switch at most per batch, requests batched together


def test_task_column_names_are_accepted(server, reference):
    url, _ = server
    one = httpx.post(f"{url}/v1/tasks/mnli/predict", timeout=60,
                     json={"inputs": [{"premise": "a man is sleeping", "hypothesis": "nobody sleeps"}]}).json()
    check(one["predictions"][0], *reference("mnli", "a man is sleeping", "nobody sleeps"))


def test_served_trained_run_reproduces_its_recorded_dev_accuracy(server, trained, data_dir):  # noqa: F811
    """The run's dev set sent over HTTP gives the accuracy `train` measured through the Trainer."""
    from pathlib import Path

    from diffprune.tasks import custom_task, load_task_data

    url, _ = server
    spec = custom_task(Path(data_dir) / "train.tsv", Path(data_dir) / "dev.tsv", ["sentence"], "label", name="toy")
    dev = load_task_data(spec, None, max_train_samples=1, max_eval_samples=16, seed=42).evals["dev"]
    texts, labels = list(dev["text_a"]), [int(x) for x in dev["label"]]
    preds = []
    for start in range(0, len(texts), 8):
        body = {"inputs": [{"text": t} for t in texts[start:start + 8]]}
        preds += httpx.post(f"{url}/v1/tasks/toy/predict", json=body, timeout=60).json()["predictions"]
    accuracy = sum(spec.label_names.index(p["label"]) == y for p, y in zip(preds, labels)) / len(labels)
    recorded = json.loads((trained / "metrics.json").read_text())["final"]["dev"]["accuracy"]
    assert accuracy == pytest.approx(recorded)


def test_tasks_and_health(server, diffs_root):
    url, service = server
    listing = httpx.get(f"{url}/v1/tasks", timeout=30).json()
    tasks = {t["name"]: t for t in listing["tasks"]}
    assert sorted(tasks) == ["mnli", "rte", "stsb", "toy"]
    assert tasks["mnli"]["labels"] == ["entailment", "neutral", "contradiction"]
    assert tasks["stsb"]["regression"] and tasks["stsb"]["labels"] is None
    assert tasks["rte"]["num_texts"] == 2 and tasks["toy"]["num_texts"] is None
    assert tasks["rte"]["fields"] == [["text", "sentence1"], ["text_pair", "sentence2"]]
    for name, task in tasks.items():
        switcher = service.tasks[name].group.switcher
        assert task["kind"] == "classification"
        assert task["nonzeros"] == switcher.diff(name).nnz > 0
        assert task["resident_bytes"] == switcher.nbytes(name)
        assert task["stored_bytes"] > 0
    model = service.groups["classification"].model
    assert listing["memory"]["base_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert listing["memory"]["base_copies"] == 1
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["tasks"] == 4


BAD = [  # (task, raw body, status, words in the message)
    ("nope", b'{"inputs": [{"text": "x"}]}', 404, "no task 'nope'"),
    ("rte", b'{"inputs": [{"text": "x"', 400, "not valid JSON"),
    ("rte", b'\xff\xfe', 400, "not valid JSON"),
    ("rte", b'[1, 2]', 422, "JSON object"),
    ("rte", b'{"input": []}', 422, "JSON object"),
    ("rte", b'{"inputs": [], "x": 1}', 422, "unknown field"),
    ("rte", b'{"inputs": []}', 422, "non-empty list"),
    ("rte", b'{"inputs": ["x"]}', 422, "must be an object"),
    ("rte", b'{"inputs": [{"text_pair": "x"}]}', 422, 'no "text" field'),
    ("rte", b'{"inputs": [{"text": "x"}]}', 422, "text pairs"),
    ("rte", b'{"inputs": [{"text": 3, "text_pair": "y"}]}', 422, "must be a string"),
    ("rte", b'{"inputs": [{"text": "x", "sentence1": "y", "text_pair": "z"}]}', 422, "name the same text"),
    ("rte", b'{"inputs": [{"txt": "x"}]}', 422, "unknown field"),
    ("mnli", json.dumps({"inputs": [{"text": "a", "text_pair": "b"}] * 9}).encode(), 413, "limit is 8"),
    ("rte", json.dumps({"inputs": [{"text": "a" * 5000, "text_pair": "b"}]}).encode(), 413, "limit"),
]


@pytest.mark.parametrize("task,body,status,words", BAD)
def test_bad_requests_get_a_clear_json_error_and_the_server_keeps_serving(server, task, body, status, words):
    url, _ = server
    response = httpx.post(f"{url}/v1/tasks/{task}/predict", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and words in error["message"]
    ok = httpx.post(f"{url}/v1/tasks/toy/predict", json={"inputs": [{"text": "good"}]}, timeout=30)
    assert ok.status_code == 200


def test_a_failing_batch_is_a_json_500_and_the_worker_goes_on(server, monkeypatch):
    url, service = server
    real = service.batcher.run
    calls = []

    def failing_once(task, pairs):
        calls.append(task)
        if len(calls) == 1:
            raise RuntimeError("simulated failure inside the model")
        return real(task, pairs)

    monkeypatch.setattr(service.batcher, "run", failing_once)
    body = {"inputs": [{"text": "good"}]}
    failed = httpx.post(f"{url}/v1/tasks/toy/predict", json=body, timeout=30)
    assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/tasks/toy/predict", json=body, timeout=30).status_code == 200


def test_unknown_route_is_a_json_404(server):
    url, _ = server
    response = httpx.get(f"{url}/v2/whatever", timeout=30)
    assert response.status_code == 404 and "no route" in response.json()["error"]["message"]


def test_diffs_that_cannot_be_served_are_refused_before_loading(tmp_path, tiny_model_dir):
    base, _, _ = load_model(str(tiny_model_dir), 2)
    with pytest.raises(DiffpruneError, match="no task diff under"):
        load_service(tmp_path)
    save_diff(random_diff(base, 1, method="lora"), tmp_path / "lora", base)
    with pytest.raises(DiffpruneError, match="adds modules"):
        load_service(tmp_path, str(tiny_model_dir))


def test_serve_without_fastapi_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--diffs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffprune: error:") and "pip install 'diffprune[serve]'" in err


def test_core_imports_without_the_serve_extra():
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "import diffprune, diffprune.cli, diffprune.serve\n"
            "diffprune.cli.build_parser().parse_args(['serve', '--diffs', 'x'])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": src_path(), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr


def test_the_serve_command_runs_a_server(diffs_root, tiny_model_dir, tmp_path):
    """`diffprune serve` as a user starts it: a process that loads, listens, answers, and stops on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": src_path(), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffprune", "serve", "--base", str(tiny_model_dir), "--diffs",
                             str(diffs_root), "--port", str(port), "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded machine takes minutes to import torch and load
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        answer = httpx.post(f"{url}/v1/tasks/stsb/predict", timeout=30,
                            json={"inputs": [{"sentence1": "a man sleeps", "sentence2": "nobody sleeps"}]})
        assert answer.status_code == 200 and isinstance(answer.json()["predictions"][0]["value"], float)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "4 task diffs" in log and "merged models would be" in log  # the memory line at start-up
