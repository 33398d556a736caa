"""What `diffprune serve` serves, without the web framework: tasks loaded over one base, input checks,
and the single worker that batches requests per task.

One base model is loaded once and every task diff is added to a `TaskSwitcher`. Requests go into one queue
per task; a single worker thread takes the task whose oldest request has waited longest, takes as many of
that task's requests as fit in `max_batch` inputs, switches to the task once, and runs the model. Every
switch and every forward pass happen on that thread, so a forward pass never sees a half-switched model
and a switch never happens in the middle of a batch.

Inputs are tokenised as `diffprune eval` tokenises dev data (`train.data.tokenize`: each text cut to
64 characters per token of max length, then `truncation=True, max_length=L`, padding to the longest input of
the forward pass), with L the diff's training max length. So a served prediction is the one evaluation
computes, up to float rounding from the batch's padding length.

Importable without FastAPI; `app.py` puts HTTP on top.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import re
import resource
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DiffpruneError
from ..storage import TaskSwitcher, load_diff
from ..storage.format import TaskDiff
from ..storage.switch import check_method

log = logging.getLogger("diffprune.serve")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_MAX_LENGTH = 128  # what `diffprune eval` uses for a diff that does not record its own


class RequestError(Exception):
    """A bad request: HTTP status and a message that says what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Task:
    """One served task: its diff, where it came from, how its inputs are named and tokenised."""
    name: str
    diff: TaskDiff
    path: Path
    max_length: int
    num_texts: int | None          # 1 or 2 when the task's spec is known (GLUE), None: either
    aliases: tuple[tuple[str, ...], ...] = ()  # accepted names of text 1 and text 2 besides text/text_pair
    stored_bytes: int = 0

    @property
    def labels(self) -> list[str] | None:
        return self.diff.label_names

    def describe(self, switcher: TaskSwitcher) -> dict:
        fields = [["text", *self.aliases[0]] if self.aliases else ["text"],
                  ["text_pair", *self.aliases[1]] if len(self.aliases) > 1 else ["text_pair"]]
        return {"name": self.name, "task": self.diff.task, "method": self.diff.method,
                "labels": self.labels, "regression": self.labels is None, "num_texts": self.num_texts,
                "fields": fields[: self.num_texts] if self.num_texts else fields,
                "max_length": self.max_length, "nonzeros": self.diff.nnz,
                "dense_params": sum(int(t.numel()) for t in self.diff.dense.values()),
                "stored_bytes": self.stored_bytes, "resident_bytes": switcher.nbytes(self.name)}

    def parse(self, payload, max_inputs: int) -> list[tuple[str, str | None]]:
        """`{"inputs": [{"text": …, "text_pair": …}, …]}` → [(text, text_pair or None)]; RequestError if not."""
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise RequestError(422, 'the body must be a JSON object {"inputs": [{"text": "..."}, ...]}')
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise RequestError(422, f"unknown field(s) {extra} in the body; only \"inputs\" is read")
        inputs = payload["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise RequestError(422, '"inputs" must be a non-empty list of objects like {"text": "..."}')
        if len(inputs) > max_inputs:
            raise RequestError(413, f"{len(inputs)} inputs in one request; the limit is {max_inputs} "
                                    "(send several requests or start the server with a larger --max-inputs)")
        return [self._one(item, i) for i, item in enumerate(inputs)]

    def _one(self, item, i: int) -> tuple[str, str | None]:
        if not isinstance(item, dict):
            raise RequestError(422, f"inputs[{i}] must be an object like {{\"text\": \"...\"}}")
        names = (("text", *(self.aliases[0] if self.aliases else ())),
                 ("text_pair", *(self.aliases[1] if len(self.aliases) > 1 else ())))
        known = set(names[0]) | set(names[1])
        unknown = sorted(set(item) - known)
        if unknown:
            raise RequestError(422, f"inputs[{i}] has unknown field(s) {unknown}; task '{self.name}' reads "
                                    f"{' / '.join(names[0])} and {' / '.join(names[1])}")
        texts = []
        for slot in names:
            given = [k for k in slot if k in item]
            if len(given) > 1:
                raise RequestError(422, f"inputs[{i}] gives {' and '.join(given)}, which name the same text")
            value = item[given[0]] if given else None
            if given and not isinstance(value, str):
                raise RequestError(422, f"inputs[{i}].{given[0]} must be a string, got {type(value).__name__}")
            texts.append(value)
        text, pair = texts
        if text is None:
            raise RequestError(422, f"inputs[{i}] has no \"text\" field (task '{self.name}' reads "
                                    f"{' / '.join(names[0])})")
        if self.num_texts == 2 and pair is None:
            raise RequestError(422, f"inputs[{i}]: task '{self.name}' classifies text pairs; give "
                                    f"\"text_pair\" too ({' / '.join(names[1])})")
        if self.num_texts == 1 and pair is not None:
            raise RequestError(422, f"inputs[{i}]: task '{self.name}' takes a single text; drop \"text_pair\"")
        return text, pair


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


def find_task_dirs(root: Path) -> dict[str, Path]:
    """Every task diff under `root`: each subfolder holding a run (`diff/`) or a diff, named by the folder;
    `root` itself when it is one."""
    from ..api import find_diff_dir

    root = Path(root)
    if not root.is_dir():
        raise DiffpruneError(f"--diffs {root} is not a folder; give a folder of task runs or diffs")
    candidates = [root] if (root / "diff_config.json").exists() or (root / "diff" / "diff_config.json").exists() \
        else sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {}
    for folder in candidates:
        try:
            path = find_diff_dir(folder)
        except DiffpruneError:
            continue
        if not TASK_NAME.match(folder.name):
            raise DiffpruneError(f"{folder}: a task is named by its folder and appears in URLs; rename it to "
                                 "letters, digits, '.', '_' and '-'")
        found[folder.name] = path
    if not found:
        raise DiffpruneError(f"no task diff under {root} (expected {root}/<task>/diff/diff_config.json or "
                             f"{root}/<task>/diff_config.json)")
    return found


def task_max_length(diff: TaskDiff, path: Path) -> int:
    """The max length the diff was trained with (diff extra, else the run's run_config.json), as eval."""
    if diff.extra.get("max_length"):
        return int(diff.extra["max_length"])
    for config in (path.parent / "run_config.json", path / "run_config.json"):
        try:
            return int(json.loads(config.read_text())["max_length"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return DEFAULT_MAX_LENGTH


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Service:
    """The base model, its switcher, the tasks and the worker: everything the HTTP layer calls."""
    model: torch.nn.Module
    tokenizer: object
    switcher: TaskSwitcher
    tasks: dict[str, Task]
    max_batch: int = 32
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    base: str = ""
    counters: dict = field(default_factory=lambda: {"batches": 0, "switches": 0, "inputs": 0})

    def __post_init__(self):
        self.batcher = Batcher(self.run_batch, self.max_batch)

    def run_batch(self, name: str, pairs: list[tuple[str, str | None]]) -> list[dict]:
        """Switch to `name` once and predict every pair, `max_batch` at a time (worker thread only)."""
        from ..train.data import encode_texts

        task = self.tasks[name]
        if self.switcher.active != name:
            self.switcher.activate(name)
            self.counters["switches"] += 1
        self.counters["batches"] += 1
        self.counters["inputs"] += len(pairs)
        device = next(self.model.parameters()).device
        out: list[dict] = []
        for start in range(0, len(pairs), self.max_batch):
            chunk = pairs[start:start + self.max_batch]
            features = [encode_texts(self.tokenizer, task.max_length, [a], None if b is None else [b])
                        for a, b in chunk]
            features = [{k: v[0] for k, v in f.items()} for f in features]
            batch = self.tokenizer.pad(features, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                logits = self.model(**batch).logits.float().cpu()
            out.extend(predictions(logits, task.labels))
        return out

    def memory(self) -> dict:
        per_task = {name: self.switcher.nbytes(name) for name in self.tasks}
        return {"base_bytes": model_bytes(self.model), "tasks_bytes": self.switcher.nbytes(),
                "per_task_bytes": per_task,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def predictions(logits: torch.Tensor, labels: list[str] | None) -> list[dict]:
    """Classification: the top label, its probability and every label's; regression: the value."""
    if labels is None:
        return [{"value": float(v)} for v in logits[:, 0]]
    probs = logits.softmax(-1)
    out = []
    for row in probs:
        top = int(row.argmax())
        out.append({"label": labels[top], "score": float(row[top]),
                    "scores": {label: float(p) for label, p in zip(labels, row)}})
    return out


@dataclass(eq=False)
class _Request:
    seq: int
    pairs: list
    future: concurrent.futures.Future


class Batcher:
    """Per-task queues and one worker thread; `submit` returns a Future of the request's predictions."""

    def __init__(self, run, max_batch: int):
        self.run, self.max_batch = run, max_batch
        self.queues: dict[str, deque[_Request]] = {}
        self.cond = threading.Condition()
        self.seq = itertools.count()
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="diffprune-inference", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, task: str, pairs: list) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if self.stopping:
                raise RequestError(503, "the server is shutting down")
            self.queues.setdefault(task, deque()).append(_Request(next(self.seq), pairs, future))
            self.cond.notify()
        return future

    def _take(self) -> tuple[str, list[_Request]] | None:
        with self.cond:
            while not self.stopping and not any(self.queues.values()):
                self.cond.wait()
            if self.stopping:
                for queue in self.queues.values():
                    for req in queue:
                        req.future.set_exception(RequestError(503, "the server is shutting down"))
                    queue.clear()
                return None
            # the task whose oldest request has waited longest, so no task starves
            task = min((q[0].seq, t) for t, q in self.queues.items() if q)[1]
            queue, taken, size = self.queues[task], [], 0
            while queue and (not taken or size + len(queue[0].pairs) <= self.max_batch):
                req = queue.popleft()
                taken.append(req)
                size += len(req.pairs)
            return task, taken

    def _loop(self) -> None:
        while True:
            work = self._take()
            if work is None:
                return
            task, taken = work
            try:
                results = self.run(task, [p for req in taken for p in req.pairs])
            except BaseException as exc:  # a failed batch fails its requests, never the worker
                log.exception("batch for task %s failed", task)
                for req in taken:
                    req.future.set_exception(exc)
                continue
            start = 0
            for req in taken:
                req.future.set_result(results[start:start + len(req.pairs)])
                start += len(req.pairs)


def load_service(diffs: str | Path, base: str | None = None, max_batch: int = 32, max_length: int | None = None,
                 max_inputs: int = 256, max_body_bytes: int = 1 << 20, check_fingerprint: bool = True) -> Service:
    """Load the base once and every task diff under `diffs` (checked before the model is loaded)."""
    from ..api import diff_kind, load_base_for_diff
    from ..train.pipeline import max_positions

    for flag, value in (("--max-batch", max_batch), ("--max-inputs", max_inputs), ("--max-length", max_length),
                        ("--max-body-bytes", max_body_bytes)):
        if value is not None and value <= 0:
            raise DiffpruneError(f"{flag} must be positive, got {value}")
    paths = find_task_dirs(Path(diffs))
    loaded = {}
    for name, path in paths.items():
        diff = load_diff(path)
        check_method(diff, f"{path}")
        if diff_kind(diff) != "classification":  # QA's span outputs need decoding
            raise DiffpruneError(f"{path} holds a '{diff_kind(diff)}' task diff (task '{diff.task}'); "
                                 "diffprune serve answers classification and regression tasks only")
        loaded[name] = (diff, path)
    bases = sorted({d.base_model for d, _ in loaded.values()})
    if base is None:
        if len(bases) != 1:
            raise DiffpruneError(f"the diffs were trained on different base models ({', '.join(bases)}); pick one "
                                 "with --base (diffs of another base are refused by their fingerprint)")
        base = bases[0]
    first = next(iter(loaded.values()))[0]
    model, tokenizer, _ = load_base_for_diff(None, base, first)
    model.eval()
    limit = max_positions(model.config)
    switcher = TaskSwitcher(model)
    tasks = {}
    for name, (diff, path) in loaded.items():
        switcher.add(name, diff, check_fingerprint=check_fingerprint)
        length = max_length or task_max_length(diff, path)
        if limit is not None:
            length = min(length, limit)
        num_texts, aliases = task_inputs(diff)
        stored = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        tasks[name] = Task(name, diff, path, length, num_texts, aliases, stored)
        log.info("task %s: %s diff of task %s, %d nonzeros, %.1f MB resident", name, diff.method, diff.task,
                 diff.nnz, switcher.nbytes(name) / 1e6)
    service = Service(model, tokenizer, switcher, tasks, max_batch, max_inputs, max_body_bytes, base)
    mem = service.memory()
    log.info("base %s: %.1f MB once; %d task diffs: %.1f MB in all (%d merged models would be %.1f MB); "
             "peak RSS %.1f MB", base, mem["base_bytes"] / 1e6, len(tasks), mem["tasks_bytes"] / 1e6, len(tasks),
             len(tasks) * mem["base_bytes"] / 1e6, mem["peak_rss_bytes"] / 1e6)
    return service
