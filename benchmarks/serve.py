"""Serving many tasks over one base model: switch time, requests per second and latency, memory.

    python benchmarks/serve.py switch --model minilm --threads 1       # TaskSwitcher vs apply_diff + revert
    python benchmarks/serve.py switch --model bert-base --threads 1    # BERT-base built from its config
    python benchmarks/serve.py serve --model minilm --seconds 20      # HTTP: plain model, 1 task, 8 tasks mixed
    python benchmarks/serve.py memory --model bert-base                # base + diffs for 1, 8, 50 tasks

Diffs are random: 0.5% of every non-head tensor's entries (distinct positions, N(0, 1e-3) values) and a
dense head, so they touch the weights as a 0.5% unstructured Diff Pruning diff does (a structured one touches
fewer tensors, which is cheaper). `bert-base` is `BertConfig()` (110M parameters, random weights). Timing is
the wall clock of this machine, shared with other processes: medians are printed with the load average.

`serve` starts `diffprune serve` as a subprocess (`--threads` torch threads) on the diffs written to a
temporary folder, then sends requests of one input each from `--clients` threads of this process for
`--seconds`: "plain model" serves one task whose diff is only a head (no sparse entries: the base model as a
merged model would run), "1 task" one 0.5% diff, "8 tasks" 8 diffs with every request to a random one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HEAD = ("classifier.weight", "classifier.bias")


def load(model_name: str, num_labels: int = 2):
    if model_name == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(num_labels=num_labels)).eval()
    from diffprune.models import load_model

    return load_model(model_name, num_labels, tokenizer=False)[0].eval()


def random_diff(model, seed: int, share: float = 0.005, labels: int = 2, sparse: bool = True):
    """A random 0.5% diff (positions: sorted unique draws, so a few collisions make it a hair under 0.5%)."""
    from diffprune.storage import SparseDelta, TaskDiff

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, p in model.named_parameters():
        if name in HEAD or not sparse:
            continue
        k = max(1, int(p.numel() * share))
        idx = torch.unique(torch.randint(0, p.numel(), (k,), generator=g))
        deltas[name] = SparseDelta(tuple(p.shape), idx, torch.randn(idx.numel(), generator=g) * 1e-3)
    hidden = model.get_parameter(HEAD[0]).shape[1]
    dense = {HEAD[0]: torch.randn(labels, hidden, generator=g) * 0.02, HEAD[1]: torch.zeros(labels)}
    names = [f"label{i}" for i in range(labels)]
    return TaskDiff("diff-pruning", "base", f"task{seed}", names, {}, deltas, dense, extra={"max_length": 128})


def load_avg() -> float:
    return os.getloadavg()[0]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def cmd_switch(args) -> dict:
    from diffprune.storage import apply_diff
    from diffprune.storage.switch import TaskSwitcher

    torch.set_num_threads(args.threads)
    model = load(args.model)
    a, b = random_diff(model, 1), random_diff(model, 2)  # apply_diff needs the model's head shape
    params = sum(p.numel() for p in model.parameters())
    rows = {"model": args.model, "params": params, "nnz_per_diff": a.nnz, "threads": args.threads}
    # the old way: revert the previous task, apply the next (checks and index conversion every time)
    state = {"handle": apply_diff(model, a), "next": b}

    def revert_apply():
        state["handle"].revert()
        nxt = state["next"]
        state["handle"], state["next"] = apply_diff(model, nxt), (a if nxt is b else b)

    rows["apply_revert_ms"] = timed(revert_apply, max(3, args.repeats // 5))
    state["handle"].revert()
    for pack in (True, False):
        switcher = TaskSwitcher(model, pack=pack)
        start = time.perf_counter()
        switcher.add("a", a)
        switcher.add("b", b)
        rows[f"add_ms_pack={pack}"] = (time.perf_counter() - start) * 1e3 / 2
        order = iter(["a", "b"] * args.repeats)
        rows[f"switch_ms_pack={pack}"] = timed(lambda: switcher.activate(next(order)), 2 * args.repeats)
        switcher.deactivate()
        del switcher
    rows["load_avg"] = load_avg()
    summary = {k: (round(statistics.median(v), 2), round(min(v), 2)) if isinstance(v, list) else v
               for k, v in rows.items()}
    print(json.dumps(summary))
    return summary


def cmd_memory(args) -> dict:
    from diffprune.storage.switch import TaskSwitcher

    model = load(args.model)
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    switcher = TaskSwitcher(model)
    out = {"model": args.model, "base_bytes": base, "rows": []}
    added = 0
    for count in (1, 8, 50):
        while added < count:
            diff = random_diff(model, 100 + added)
            switcher.add(f"t{added}", diff)
            added += 1
        stored = sum(diff.nnz * 8 + sum(t.numel() * 4 for t in diff.dense.values())
                     for diff in (switcher.diff(n) for n in switcher.tasks))
        out["rows"].append({"tasks": count, "resident_bytes": base + switcher.nbytes(), "stored_bytes": stored,
                            "merged_models_bytes": count * base})
    print(json.dumps(out))
    return out


def write_diffs(model_name: str, root: Path, tasks: int, plain: bool) -> None:
    from diffprune.storage import save_diff

    model = load(model_name)
    for i in range(tasks):
        diff = random_diff(model, 10 + i, sparse=not plain)
        diff.base_model = model_name
        save_diff(diff, root / f"t{i}", model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(url: str, tasks: list[str], seconds: float, clients: int, texts: list[str]) -> dict:
    import httpx

    latencies: list[float] = []
    lock, stop = threading.Lock(), time.perf_counter() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop:
                task = rng.choice(tasks)
                start = time.perf_counter()
                r = http.post(f"{url}/v1/tasks/{task}/predict", json={"inputs": [{"text": rng.choice(texts)}]})
                r.raise_for_status()
                with lock:
                    latencies.append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(latencies[len(latencies) // 2], 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def serve_row(args, label: str, tasks: int, plain: bool, texts: list[str]) -> dict:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        write_diffs(args.model, Path(tmp), tasks, plain)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "diffprune", "serve", "--base", args.model, "--diffs", tmp, "--port",
               str(port), "--threads", str(args.threads), "--max-batch", str(args.max_batch)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            names = [f"t{i}" for i in range(tasks)]
            load_test(url, names, 3, args.clients, texts)  # warm-up
            before = httpx.get(f"{url}/health").json()
            row = load_test(url, names, args.seconds, args.clients, texts)
            after = httpx.get(f"{url}/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    batches = after["batches"] - before["batches"]
    row.update(label=label, batches=batches, switches=after["switches"] - before["switches"],
               inputs_per_batch=round((after["inputs"] - before["inputs"]) / max(1, batches), 1),
               load_avg=load_avg())
    print(json.dumps(row), flush=True)
    return row


def cmd_serve(args) -> list[dict]:
    rng = random.Random(0)
    words = ("the movie was not good at all but the actors were great and the plot moved fast "
             "a man is sleeping on the couch while nobody in the house sleeps").split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(200)]
    return [serve_row(args, "plain model", 1, True, texts), serve_row(args, "1 task", 1, False, texts),
            serve_row(args, "8 tasks mixed", 8, False, texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("switch", "serve", "memory"))
    parser.add_argument("--model", default="minilm", help="minilm, bert-base (from config) or a model path")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    {"switch": cmd_switch, "serve": cmd_serve, "memory": cmd_memory}[args.part](args)


if __name__ == "__main__":
    main()
