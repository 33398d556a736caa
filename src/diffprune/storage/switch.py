"""Fast task switching: one resident base model, many task diffs, one of them active at a time.

`apply_diff` + `revert` re-reads and re-checks a diff on every call; serving many tasks from one model needs
a switch that costs little more than writing the touched values. `TaskSwitcher.add` does all the work a
switch can avoid, once: it checks the diff (names, shapes, tied aliases, base fingerprint), moves its flat
positions to the model's device as int64, and computes, at those positions, both the base values and the
task values exactly as `apply_diff` would (float32 add, then cast to the parameter's dtype). `add` reads
the model and never writes it. A switch is then one index copy putting the previous task's positions back
to their saved base values and one writing the new task's values, per flat weight buffer: the constructor
packs the parameters of each dtype into one buffer (`pack=True`), so that is two calls in all, whatever the
number of tensors. Dense entries (the task heads) are copied whole. Because both come from saved values and
not from arithmetic on the current weights, any sequence of switches leaves the weights bit for bit equal to
base + active diff, and `deactivate()` leaves the base bit for bit. Memory: 16 bytes per nonzero (int64
position, base value, task value) against the 8 stored.

Task heads may differ in shape between tasks (a 2-class, a 3-class and a regression head over one base):
a dense entry of a task-head parameter (`archs.task_head_names`) whose first dimension differs from the
model's is given its own buffer, and the parameter's `.data` points at it while that task is active. The
model's `config.num_labels` is not changed (transformers' classification forward passes use it only for the
loss); read the labels from the diff.

Taken: diffs of methods that only change existing weights (sparse and dense entries): diff-pruning,
non-adaptive-diff-pruning, lt-sft, bitfit, last-layer, full (full is dense everywhere: a switch copies the
whole model). Refused: methods that add modules (lora, adapter-houlsby, adapter-pfeiffer, prune-lora,
head-pruning): their tensors belong to layers the base model does not have; merge such a run
(`diffprune merge`) and serve the merged model on its own.

Not thread-safe on its own for concurrent forward passes: callers must not run the model while a switch
happens (`diffprune serve` runs every forward pass and every switch on one worker thread). The switcher
keeps views into the parameters' storage, so do not move the model (`.to()`) or load weights into it after
`add`.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from dataclasses import dataclass, field

import torch

from ..archs import task_head_names
from ..errors import DiffpruneError
from .apply import check_diff
from .format import TaskDiff, fingerprint


@dataclass(eq=False)
class _Segment:
    """One task's sparse entries inside one flat weight buffer: concatenated positions and values, so a
    switch is one index copy per buffer (one in all when the parameters are packed), not one per tensor."""
    flat: torch.Tensor        # the buffer (a packed dtype group, or one parameter's storage), 1-D
    index: torch.Tensor       # int64 positions in `flat`, on its device
    base: torch.Tensor        # base values there, in the buffer's dtype
    task: torch.Tensor        # (base.float() + delta).to(dtype): exactly what apply_diff writes


@dataclass(eq=False)
class _Dense:
    """One dense replacement of one task; `own` is set when its shape differs from the model's."""
    name: str
    param: torch.nn.Parameter
    value: torch.Tensor       # in the parameter's dtype, on its device
    own: torch.Tensor | None  # the buffer param.data points at while active (reshaped heads only)


@dataclass(eq=False)
class _Task:
    diff: TaskDiff
    segments: list[_Segment] = field(default_factory=list)
    # canonical parameter name -> (segment number, start, end, offset of the parameter in the buffer)
    spans: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    dense: list[_Dense] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Memory this task holds in the switcher (positions, base and task values, dense copies)."""
        total = sum(s.index.nbytes + s.base.nbytes + s.task.nbytes for s in self.segments)
        return total + sum(d.value.nbytes + (d.own.nbytes if d.own is not None else 0) for d in self.dense)

    def entries(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions in the parameter, base values there) of this task's sparse entry for `name`."""
        if name not in self.spans:
            return None
        k, start, end, offset = self.spans[name]
        seg = self.segments[k]
        return seg.index[start:end] - offset, seg.base[start:end]


def _adds_modules(method) -> bool:
    """Whether a method's `attach` is its own (it adds modules), not `Method`'s default."""
    from ..methods.base import Method

    return getattr(method.attach, "__func__", None) is not Method.attach.__func__


def check_method(diff: TaskDiff, where: str = "the diff") -> None:
    """Refuse diffs of methods that add modules to the base model (their `attach` is not the default)."""
    from ..methods import get_method
    from ..methods.base import METHODS

    if _adds_modules(get_method(diff.method)):
        taken = sorted(name for name, cls in METHODS.items() if not _adds_modules(cls))
        raise DiffpruneError(
            f"{where} was trained with '{diff.method}', which adds modules to the base model; task switching "
            f"takes diffs that only change existing weights ({', '.join(taken)}). Merge this run with "
            "'diffprune merge' and serve the merged model on its own")


class TaskSwitcher:
    """Holds `model` (the base) and any number of task diffs; `activate(name)` switches in place.

        switcher = TaskSwitcher(model)
        switcher.add("rte", load_diff("runs/rte/diff"))     # checks and precomputes; the model is unchanged
        switcher.add("sst2", load_diff("runs/sst2/diff"))
        switcher.activate("rte"); model(**batch)            # base + rte diff, bit for bit as apply_diff
        switcher.activate("sst2"); model(**batch)
        switcher.deactivate()                               # the base model, bit for bit
    """

    def __init__(self, model: torch.nn.Module, pack: bool = True):
        """`pack=True` first moves the parameters of each (device, dtype) into one flat buffer (each
        parameter becomes a view of it; values unchanged), so that a switch is two index copies in all
        instead of two per tensor (~25% less per switch on BERT-base here). Peak memory while packing is
        twice the model's. A packed model runs, and saves with `save_pretrained`, as before
        (tests/test_switch.py)."""
        self.model = model
        self._tasks: dict[str, _Task] = {}
        self._active: str | None = None
        # tied aliases resolve to one name (the first `named_parameters` gives), the key of all saved state
        self._canon = {id(p): n for n, p in model.named_parameters()}
        self._head = {self._canon[id(model.get_parameter(n))] for n in task_head_names(model)}
        # per dense-replaced parameter: (its original storage, the base value) to restore on switch-away
        self._home: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fingerprints: dict[tuple[str, ...], str] = {}  # base fingerprints by name set (base is fixed)
        self._lock = threading.RLock()
        # canonical name -> (flat buffer holding the parameter's home storage, its offset there)
        self._where: dict[str, tuple[torch.Tensor, int]] = {}
        self.packed = bool(pack)
        with torch.no_grad():
            self._pack() if pack else self._unpacked()

    def _unpacked(self) -> None:
        for name, param in self.model.named_parameters():
            if param.is_contiguous():
                self._where[name] = (param.data.view(-1), 0)

    def _pack(self) -> None:
        groups: dict[tuple, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in self.model.named_parameters():
            groups.setdefault((param.device, param.dtype), []).append((name, param))
        for (device, dtype), members in groups.items():
            flat = torch.empty(sum(p.numel() for _, p in members), dtype=dtype, device=device)
            _advise_huge_pages(flat)  # before the first write, which is when pages are given
            offset = 0
            for name, param in members:
                n = param.numel()
                flat[offset:offset + n].copy_(param.data.reshape(-1))
                param.data = flat[offset:offset + n].view(param.shape)
                self._where[name] = (flat, offset)
                offset += n

    # ------------------------------------------------------------------------------------------ queries

    @property
    def active(self) -> str | None:
        return self._active

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def diff(self, name: str) -> TaskDiff:
        return self._get(name).diff

    def nbytes(self, name: str | None = None) -> int:
        """Bytes held for task `name` (all tasks, plus the saved base values of dense entries, if None)."""
        if name is not None:
            return self._get(name).nbytes
        return sum(t.nbytes for t in self._tasks.values()) + sum(b.nbytes for _, b in self._home.values())

    def _get(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise DiffpruneError(f"no task '{name}' in the switcher (tasks: {', '.join(self._tasks) or 'none'})") \
                from None

    # ------------------------------------------------------------------------------------------ add / remove

    def add(self, name: str, diff: TaskDiff, check_fingerprint: bool = True) -> None:
        """Check `diff` against the base model and precompute its switch; the model is not modified."""
        with self._lock:
            if name in self._tasks:
                raise DiffpruneError(f"task '{name}' is already in the switcher; remove it first")
            where = f"task '{name}'"
            check_method(diff, where)
            reshaped = self._reshaped_heads(diff, where)
            view = _BaseView(self)
            try:
                check_diff(view, dataclasses.replace(diff, dense={k: v for k, v in diff.dense.items()
                                                                  if k not in reshaped}), check_fingerprint=False)
            except DiffpruneError as exc:
                raise DiffpruneError(f"{where}: {exc}") from None
            if check_fingerprint and diff.fingerprint is not None:
                self._check_fingerprint(view, diff, where)
            task = _Task(diff)
            with torch.no_grad():
                by_buffer: dict[int, list] = {}
                for pname, delta in diff.sparse.items():
                    param = self.model.get_parameter(pname)
                    pname = self.canonical(param)
                    if pname not in self._where:
                        raise DiffpruneError(f"{where}: parameter '{pname}' is not contiguous; task switching "
                                             "needs contiguous parameters (or TaskSwitcher(model, pack=True))")
                    flat, offset = self._where[pname]
                    local = delta.indices.to(device=flat.device, dtype=torch.int64)
                    base = view.base_values(pname, param, local)
                    new = (base.float() + delta.values.to(device=flat.device, dtype=torch.float32)).to(flat.dtype)
                    by_buffer.setdefault(id(flat), [flat, []])[1].append((pname, offset, local + offset, base, new))
                for k, (flat, items) in enumerate(by_buffer.values()):
                    items.sort(key=lambda it: it[1])  # positions ascending through memory
                    start = 0
                    for pname, offset, index, _, _ in items:
                        task.spans[pname] = (k, start, start + index.numel(), offset)
                        start += index.numel()
                    task.segments.append(_Segment(flat, *(torch.cat([it[j] for it in items]) for j in (2, 3, 4))))
                for pname, value in diff.dense.items():
                    param = self.model.get_parameter(pname)
                    pname = self.canonical(param)
                    if pname not in self._home:
                        self._home[pname] = (param.data, view.base_tensor(pname, param))
                    value = value.to(device=param.device, dtype=param.dtype).clone()
                    own = torch.empty_like(value) if pname in reshaped else None
                    task.dense.append(_Dense(pname, param, value, own))
            self._tasks[name] = task

    def remove(self, name: str) -> None:
        """Forget task `name` (deactivating it first if it is active)."""
        with self._lock:
            self._get(name)
            if self._active == name:
                self.deactivate()
            del self._tasks[name]

    def _reshaped_heads(self, diff: TaskDiff, where: str) -> set[str]:
        """Dense task-head entries whose number of outputs differs from the model's head (allowed)."""
        out = set()
        for pname, value in diff.dense.items():
            param = _param_or_none(self.model, pname)
            if param is None:
                continue  # check_diff names it
            pname = self.canonical(param)
            if pname not in self._head:
                continue
            home = self._home[pname][0] if pname in self._home else param.data
            if tuple(value.shape) == tuple(home.shape):
                continue
            if value.dim() != home.dim() or tuple(value.shape[1:]) != tuple(home.shape[1:]):
                raise DiffpruneError(f"{where}: task head '{pname}' has shape {list(value.shape)}, the model's "
                                     f"{list(home.shape)}; heads may differ only in their number of outputs "
                                     "(first dimension)")
            out.add(pname)
        return out

    def canonical(self, param: torch.Tensor) -> str:
        return self._canon[id(param)]

    def _check_fingerprint(self, view: "_BaseView", diff: TaskDiff, where: str) -> None:
        names = tuple(diff.fingerprint_names())
        if names not in self._fingerprints:
            self._fingerprints[names] = fingerprint(view, names)
        got = self._fingerprints[names]
        if got != diff.fingerprint:
            raise DiffpruneError(
                f"{where}: this diff was made for a base model with fingerprint {diff.fingerprint[:12]}…; the "
                f"model you gave has {got[:12]}… (different pretrained weights) — load the base model "
                f"'{diff.base_model}' it was trained on")

    # ------------------------------------------------------------------------------------------ switching

    def activate(self, name: str | None) -> None:
        """Make `name` the active task (None: the base model); a no-op if it already is."""
        with self._lock:
            if name == self._active:
                return
            new = self._get(name) if name is not None else None
            try:
                with torch.no_grad():
                    if self._active is not None:
                        self._restore(self._tasks[self._active])
                        self._active = None
                    if new is not None:
                        self._write(new)
                        self._active = name
            except BaseException:
                self._active = None
                with torch.no_grad():  # never leave a half-written task behind: back to the base
                    if new is not None:
                        self._restore(new)
                raise

    def deactivate(self) -> None:
        """Back to the base model, bit for bit."""
        self.activate(None)

    def _restore(self, task: _Task) -> None:
        for d in task.dense:
            home, base = self._home[d.name]
            if d.param.data is not home:
                d.param.data = home
            home.copy_(base)
        for seg in task.segments:
            seg.flat.index_copy_(0, seg.index, seg.base)

    def _write(self, task: _Task) -> None:
        for seg in task.segments:
            seg.flat.index_copy_(0, seg.index, seg.task)
        for d in task.dense:
            if d.own is None:
                d.param.copy_(d.value)
            else:
                d.own.copy_(d.value)  # a fresh copy each time: nothing done to the weights outlives a switch
                d.param.data = d.own


def _advise_huge_pages(flat: torch.Tensor) -> None:
    """Ask Linux for 2 MiB pages under a packed CPU buffer (best effort; ignored where unsupported).

    A switch writes ~1 position in every 800 bytes of a 0.5% diff, all over the model: with 4 KiB pages
    nearly every write is also a TLB miss. With transparent huge pages in "madvise" mode (the common default)
    they are used only where asked for; here that made BERT-base switches ~30% faster.
    """
    if flat.device.type != "cpu" or not sys.platform.startswith("linux") or flat.nbytes < (4 << 20):
        return
    try:
        import ctypes

        page = 4096
        start = (flat.data_ptr() + page - 1) // page * page
        length = (flat.data_ptr() + flat.nbytes - start) // page * page
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass


def _param_or_none(model: torch.nn.Module, name: str):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


class _BaseView:
    """What the base model's weights are, read without writing: the model's values, except where the active
    task has changed them (there the switcher's saved base values). `check_diff` and `fingerprint` only call
    `get_parameter`, so they can be pointed at this instead of the model."""

    def __init__(self, switcher: TaskSwitcher):
        self.s = switcher
        self.active = switcher._tasks.get(switcher._active) if switcher._active is not None else None
        self.dense = {e.name for e in self.active.dense} if self.active else set()
        self._cache: dict[str, torch.Tensor] = {}

    def get_parameter(self, name: str):
        param = self.s.model.get_parameter(name)  # raises AttributeError for unknown names, as a module does
        name = self.s.canonical(param)
        if self.active is None or (name not in self.active.spans and name not in self.dense):
            return param
        if name not in self._cache:  # one object per tensor, so check_diff still sees tied aliases as one
            self._cache[name] = self.base_tensor(name, param)
        return self._cache[name]

    def base_tensor(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if name in self.s._home:
            return self.s._home[name][1].clone()
        out = param.detach().clone()
        changed = self.active.entries(name) if self.active is not None else None
        if changed is not None:
            out.view(-1).index_copy_(0, *changed)
        return out

    def base_values(self, name: str, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if name in self.s._home:
            return self.s._home[name][1].reshape(-1)[index].clone()
        values = param.detach().reshape(-1)[index].clone()
        changed = self.active.entries(name) if self.active is not None else None
        if changed is not None and changed[0].numel() and index.numel():  # positions the active task changed
            at, base = changed
            pos = torch.searchsorted(at, index).clamp_(max=at.numel() - 1)
            hit = at[pos] == index
            values[hit] = base[pos[hit]]
        return values
