"""What `diffprune serve` serves, without the web framework: tasks loaded over one base, input checks,
and the single worker that batches requests per task.

One base model is loaded once and every task diff is added to a `TaskSwitcher`. Requests go into one queue
per task; a single worker thread takes the task whose oldest request has waited longest, takes as many of
that task's requests as fit in `max_batch` inputs, switches to the task once, and runs the model. Every
switch and every forward pass happen on that thread, so a forward pass never sees a half-switched model
and a switch never happens in the middle of a batch.

What a task reads and answers depends on its kind (`inputs.py`: text classification and regression, or
extractive QA), always tokenised as `diffprune eval` tokenises dev data with the diff's training max length,
so a served prediction is the one evaluation computes, up to float rounding from the batch's padding. Task
kinds need different model classes (a classification head, a span head), so the tasks of each kind share
one base model and switcher of their own: the base is resident once per kind that is served.

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
from .inputs import INPUTS, RequestError, inputs_for

log = logging.getLogger("diffprune.serve")
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_MAX_LENGTH = 128  # what `diffprune eval` uses for a diff that does not record its own


@dataclass(eq=False)
class Group:
    """The base model loaded for one task kind and the switcher over it."""
    kind: str
    model: torch.nn.Module
    tokenizer: object
    switcher: TaskSwitcher
    max_positions: int | None = None  # the model's position limit (caps each task's max length)


@dataclass
class Task:
    """One served task: its diff, where it came from, its model group and how it reads its inputs."""
    name: str
    diff: TaskDiff
    path: Path
    max_length: int
    group: Group
    inputs: object                 # TextInputs / SpanInputs
    stored_bytes: int = 0

    @property
    def labels(self) -> list[str] | None:
        return self.diff.label_names

    def describe(self) -> dict:
        return {"name": self.name, "task": self.diff.task, "kind": self.group.kind, "method": self.diff.method,
                **self.inputs.describe(), "max_length": self.max_length, "nonzeros": self.diff.nnz,
                "dense_params": sum(int(t.numel()) for t in self.diff.dense.values()),
                "stored_bytes": self.stored_bytes, "resident_bytes": self.group.switcher.nbytes(self.name)}

    def parse(self, payload, max_inputs: int) -> list:
        """`{"inputs": [item, …]}` → one parsed input per item (`inputs.parse`); RequestError if not."""
        example = self.inputs.example
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise RequestError(422, f'the body must be a JSON object {{"inputs": [{example}, ...]}}')
        extra = sorted(set(payload) - {"inputs"})
        if extra:
            raise RequestError(422, f"unknown field(s) {extra} in the body; only \"inputs\" is read")
        inputs = payload["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise RequestError(422, f'"inputs" must be a non-empty list of objects like {example}')
        if len(inputs) > max_inputs:
            raise RequestError(413, f"{len(inputs)} inputs in one request; the limit is {max_inputs} "
                                    "(send several requests or start the server with a larger --max-inputs)")
        return [self.inputs.parse(item, i, self.name) for i, item in enumerate(inputs)]


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
    """The base model(s), their switchers, the tasks and the worker: everything the HTTP layer calls."""
    groups: dict[str, Group]
    tasks: dict[str, Task]
    max_batch: int = 32
    max_inputs: int = 256
    max_body_bytes: int = 1 << 20
    base: str = ""
    active: str | None = None      # the task of the last batch
    counters: dict = field(default_factory=lambda: {"batches": 0, "switches": 0, "inputs": 0})

    def __post_init__(self):
        self.batcher = Batcher(self.run_batch, self.max_batch)

    def run_batch(self, name: str, items: list) -> list[dict]:
        """Switch to `name` once and predict every input, `max_batch` at a time (worker thread only)."""
        task = self.tasks[name]
        switcher = task.group.switcher
        if switcher.active != name:
            switcher.activate(name)
            self.counters["switches"] += 1
        self.active = name
        self.counters["batches"] += 1
        self.counters["inputs"] += len(items)
        return task.inputs.predict(task.group.model, items, self.max_batch)

    def memory(self) -> dict:
        per_task = {name: task.group.switcher.nbytes(name) for name, task in self.tasks.items()}
        return {"base_bytes": sum(model_bytes(g.model) for g in self.groups.values()),
                "base_copies": len(self.groups), "tasks_bytes": sum(per_task.values()),
                "per_task_bytes": per_task,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


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
        if diff_kind(diff) not in INPUTS:
            raise DiffpruneError(f"{path} holds a '{diff_kind(diff)}' task diff (task '{diff.task}'); diffprune "
                                 f"serve answers {' and '.join(INPUTS)} task diffs")
        loaded[name] = (diff, path)
    bases = sorted({d.base_model for d, _ in loaded.values()})
    if base is None:
        if len(bases) != 1:
            raise DiffpruneError(f"the diffs were trained on different base models ({', '.join(bases)}); pick one "
                                 "with --base (diffs of another base are refused by their fingerprint)")
        base = bases[0]
    groups: dict[str, Group] = {}
    tasks = {}
    for name, (diff, path) in loaded.items():
        kind = diff_kind(diff)
        if kind not in groups:  # the first diff of each kind sizes its model's head
            model, tokenizer, _ = load_base_for_diff(None, base, diff)
            groups[kind] = Group(kind, model.eval(), tokenizer, TaskSwitcher(model), max_positions(model.config))
        group = groups[kind]
        group.switcher.add(name, diff, check_fingerprint=check_fingerprint)
        length = max_length or task_max_length(diff, path)
        if group.max_positions is not None:
            length = min(length, group.max_positions)
        stored = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        tasks[name] = Task(name, diff, path, length, group, inputs_for(kind, diff, group.tokenizer, length), stored)
        log.info("task %s: %s diff of %s task %s, %d nonzeros, %.1f MB resident", name, diff.method, kind,
                 diff.task, diff.nnz, group.switcher.nbytes(name) / 1e6)
    service = Service(groups, tasks, max_batch, max_inputs, max_body_bytes, base)
    mem = service.memory()
    once = "once" if len(groups) == 1 else f"once per task kind ({', '.join(groups)})"
    one = mem["base_bytes"] / len(groups)
    log.info("base %s: %.1f MB %s; %d task diffs: %.1f MB in all (%d merged models would be %.1f MB); "
             "peak RSS %.1f MB", base, mem["base_bytes"] / 1e6, once, len(tasks), mem["tasks_bytes"] / 1e6,
             len(tasks), len(tasks) * one / 1e6, mem["peak_rss_bytes"] / 1e6)
    return service
