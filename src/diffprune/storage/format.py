"""The on-disk task-diff format: data model, base-weight fingerprint, atomic save and strict load.

A task diff directory holds two files:

* ``diff_config.json`` -- format name and version, method, its hyperparameters, the base model name, the
  base-weight fingerprint, task and label names, extras, the list of stored tensors with their shapes,
  sizes, and the sha256 of the tensor file (so a flipped bit in the values is caught, not just a broken
  header).
* ``diff.safetensors`` -- the sparse part and ``dense.<name>`` for every dense entry. Version 2 (written
  by default) stores positions as deflated LEB128 gaps and values in a dtype you choose (float32, float16,
  bfloat16, or lossy int8), about 2.5–2.9 bytes per nonzero with 16-bit values; version 1 (still read, and
  written with ``format_version=1``) stores int32 positions + float32 values, the paper's 8 bytes. See
  `layout` for the tensors of each version and `codec` for the codings.

Loading never unpickles anything (json + safetensors only), and every way a directory can be broken turns
into one `DiffpruneError` line instead of a traceback or, worse, a silently wrong model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import safetensors.torch
import torch

from ..errors import DiffpruneError
from ..io import atomic_write
from . import codec, layout
from .layout import index_dtype, take as _take  # noqa: F401  (index_dtype: part of this module's API)

FORMAT_NAME = "diffprune-task-diff"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "diff_config.json"
TENSOR_FILE = "diff.safetensors"


# --------------------------------------------------------------------------------------------- data model

@dataclass(eq=False)
class SparseDelta:
    """The nonzeros of one parameter tensor's additive diff.

    `indices` are flat (row-major) positions into a tensor of `shape`, strictly increasing, so every
    position appears once and the stored form is canonical; `values` are the float32 diffs there.
    `int8_scale` is the absmax scale a diff loaded from int8 values was stored with (saving it as int8
    again reuses it, so the bytes do not drift).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    int8_scale: float | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def from_dense(cls, delta: torch.Tensor) -> "SparseDelta":
        """Keep exactly the nonzero entries of `delta` (NaNs count as nonzero, so they are not lost)."""
        delta = delta.detach()
        flat = delta.reshape(-1)
        indices = torch.nonzero(flat != 0, as_tuple=False).reshape(-1).to(device="cpu", dtype=torch.int64)
        values = flat[indices.to(flat.device)].to(device="cpu", dtype=torch.float32)
        return cls(tuple(delta.shape), indices, values)

    def to_dense(self) -> torch.Tensor:
        """The full float32 diff tensor (zeros outside the stored positions)."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.indices.long()] = self.values.float()
        return out.view(self.shape)

    def validate(self, name: str) -> None:
        """Raise a DiffpruneError naming `name` if the entry is not a well-formed sparse diff."""
        idx, val = self.indices, self.values
        if idx.dim() != 1 or val.dim() != 1:
            raise DiffpruneError(f"sparse diff '{name}': indices and values must be 1-D")
        if idx.numel() != val.numel():
            raise DiffpruneError(f"sparse diff '{name}': {idx.numel()} indices but {val.numel()} values")
        if idx.dtype not in (torch.int32, torch.int64):
            raise DiffpruneError(f"sparse diff '{name}': indices must be integers, got {idx.dtype}")
        if not val.is_floating_point():
            raise DiffpruneError(f"sparse diff '{name}': values must be floating point, got {val.dtype}")
        if idx.numel() == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.numel:
            raise DiffpruneError(f"sparse diff '{name}': index {lo if lo < 0 else hi} is out of range for "
                                 f"shape {list(self.shape)} ({self.numel} elements)")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise DiffpruneError(f"sparse diff '{name}': indices are not strictly increasing "
                                 "(unsorted or duplicated positions)")


@dataclass(eq=False)
class TaskDiff:
    """Everything needed to turn a base model into the task model.

    `sparse` holds additive diffs (θ_task = θ + δ at the stored positions); `dense` holds full replacement
    values for tensors that are trained densely (the task head, BitFit biases, ...). Parameter names are
    those of `model.named_parameters()`.
    """

    method: str
    base_model: str
    task: str
    label_names: list[str] | None
    config: dict
    sparse: dict[str, SparseDelta]
    dense: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)
    fingerprint: str | None = None
    # dtype the sparse values were loaded from (None: made in memory); `save_diff` keeps it by default
    value_dtype: str | None = None

    @property
    def nnz(self) -> int:
        """Total number of stored nonzeros over all sparse entries."""
        return sum(d.nnz for d in self.sparse.values())

    def fingerprint_names(self) -> list[str]:
        """The base tensors the fingerprint covers.

        Rule: every `sparse` name (an additive diff is meaningless on other weights), the `dense` names
        listed in ``config["fingerprint_dense"]``, and the frozen base tensors listed in
        ``config["fingerprint_base"]`` (methods that add modules on top of a frozen base, such as adapters
        and LoRA, depend on every base weight without storing any of them). Other dense entries are replacements that do not depend
        on the base value (a freshly initialised head), so they are left out: hashing them would make a
        diff unusable on a base whose head happened to be initialised with another seed.
        """
        extra = list(self.config.get("fingerprint_dense", []) or [])
        unknown = [n for n in extra if n not in self.dense]
        if unknown:
            raise DiffpruneError(f"config['fingerprint_dense'] names tensors that are not dense entries: "
                                 f"{', '.join(unknown)}")
        frozen = list(self.config.get("fingerprint_base", []) or [])
        stored = [n for n in frozen if n in self.sparse or n in self.dense]
        if stored:
            raise DiffpruneError(f"config['fingerprint_base'] names tensors stored in the diff: {', '.join(stored)}")
        return sorted(set(self.sparse) | set(extra) | set(frozen))

    def validate(self) -> None:
        """Structural checks shared by save, load and apply (raises DiffpruneError)."""
        both = sorted(set(self.sparse) & set(self.dense))
        if both:
            raise DiffpruneError(f"tensors are both sparse and dense in the diff: {', '.join(both)}")
        for name, delta in self.sparse.items():
            delta.validate(name)
            if delta.values.numel() and not bool(torch.isfinite(delta.values).all()):
                raise DiffpruneError(f"sparse diff '{name}' holds NaN or infinite values")
        for name, value in self.dense.items():
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                raise DiffpruneError(f"dense tensor '{name}' holds NaN or infinite values")
        if self.label_names is not None and not all(isinstance(n, str) for n in self.label_names):
            raise DiffpruneError("label_names must be a list of strings (or None for regression)")


# --------------------------------------------------------------------------------------------- fingerprint

_CHUNK = 1 << 22  # elements hashed at a time, so a GPU model is not copied to the CPU whole


def fingerprint(model: torch.nn.Module, names: Iterable[str]) -> str:
    """sha256 hex identifying the base weights `names` of `model`.

    For each name in sorted order it hashes the name, the dtype and shape of the hashed view and the raw
    bytes of the contiguous CPU float32 view of the parameter. Hashing the float32 view (not the storage
    dtype) means a base loaded in another float dtype fingerprints the same exactly when its values are the
    same. Names are looked up with `model.get_parameter`, so tied aliases resolve to the shared tensor.
    """
    h = hashlib.sha256()
    for name in sorted(set(names)):
        param = _get_parameter(model, name)
        if param is None:
            raise DiffpruneError(f"cannot fingerprint '{name}': the model has no such parameter")
        h.update(f"{name}\0float32\0{list(param.shape)}\0".encode())
        flat = param.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK].to(device="cpu", dtype=torch.float32).contiguous()
            h.update(chunk.numpy().tobytes())
    return h.hexdigest()


def _get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


# --------------------------------------------------------------------------------------------- atomic dirs

@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it becomes `target`, on error it is removed.

    POSIX cannot swap two directories atomically, so an existing target is first renamed aside, the new
    directory renamed in, and only then the old one deleted; if the second rename fails the old one is put
    back. Readers therefore see either the complete old or the complete new directory (or, for an instant,
    none), never a half-written one. `replaceable(path)` guards against replacing a directory that is not
    ours (e.g. a typo pointing at a home directory): non-empty directories it rejects are left alone.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise DiffpruneError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not replaceable(target):
            raise DiffpruneError(f"refusing to overwrite {target}: it is a non-empty directory that is not "
                                 "an output of this kind; choose another path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- save

def save_diff(diff: TaskDiff, directory: str | os.PathLike, base_model: torch.nn.Module | None,
              value_dtype: str | None = None, format_version: int = FORMAT_VERSION) -> Path:
    """Write `diff` to `directory` atomically and return the directory.

    `base_model` must be the *unmodified* pretrained model: its weights are fingerprinted (see
    `TaskDiff.fingerprint_names`) and the result stored in `diff.fingerprint`. Pass None to keep the
    fingerprint the diff already has (re-saving a loaded diff). A diff whose fingerprint rule covers no
    tensor gets fingerprint None: there is nothing to check, and a hash of nothing would only pretend to.

    `value_dtype` (float32, float16, bfloat16, int8) is how the sparse values are stored; default: the
    dtype the diff was loaded with, else float32, so a library call never loses precision unasked
    (`diffprune train` picks the half-precision default, see `codec.default_value_dtype`). Format version 1
    (for older diffprune) stores float32 values only.
    """
    diff.validate()
    value_dtype = codec.check_value_dtype(value_dtype or diff.value_dtype or "float32")
    if format_version not in READABLE_VERSIONS:
        raise DiffpruneError(f"cannot write diff format version {format_version} (known: {READABLE_VERSIONS})")
    if format_version == 1 and value_dtype != "float32":
        raise DiffpruneError(f"diff format version 1 stores float32 values only, not {value_dtype}")
    if base_model is not None:
        names = diff.fingerprint_names()
        diff.fingerprint = fingerprint(base_model, names) if names else None

    if format_version == 1:
        tensors, sparse_meta, coding = layout.pack_v1(diff.sparse)
    else:
        tensors, sparse_meta, coding = layout.pack_v2(diff.sparse, value_dtype)
    sparse_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dense_meta, dense_bytes = {}, 0
    for name, value in sorted(diff.dense.items()):
        t = value.detach().to("cpu").contiguous().clone()
        tensors[f"dense.{name}"] = t
        dense_meta[name] = {"shape": list(t.shape), "dtype": str(t.dtype)[6:]}
        dense_bytes += t.numel() * t.element_size()

    meta = {
        "format": FORMAT_NAME,
        "format_version": format_version,
        "method": diff.method,
        "base_model": diff.base_model,
        "fingerprint": diff.fingerprint,
        # whether a fingerprint was taken: a "fingerprint": null edited in by hand is then refused on load
        "fingerprinted": diff.fingerprint is not None,
        "task": diff.task,
        "label_names": diff.label_names,
        "config": diff.config,
        "extra": diff.extra,
        "nnz": diff.nnz,
        "tensors": {"sparse": sparse_meta, "dense": dense_meta},
        **({"coding": coding} if coding is not None else {}),
        "sizes": {"sparse_bytes": sparse_bytes, "dense_bytes": dense_bytes,
                  "dense_params": sum(t.numel() for t in diff.dense.values())},
    }
    try:  # fail before anything touches the disk
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise DiffpruneError(f"the diff's config/extra is not JSON-serialisable: {exc}") from exc

    # One metadata key only: safetensors writes its metadata map in no fixed order, and equal diffs must give
    # equal bytes. Version 2's tensor file describes its own codings too.
    st_meta = {"format": FORMAT_NAME if coding is None else json.dumps(
        {"format": FORMAT_NAME, "format_version": format_version, "coding": coding}, sort_keys=True)}
    with atomic_directory(directory, lambda p: (p / CONFIG_FILE).is_file()) as tmp:
        atomic_write(tmp / TENSOR_FILE,  # (safetensors alone creates the file 0600, whatever the umask)
                     lambda t: safetensors.torch.save_file(tensors, t, metadata=st_meta))
        meta["sizes"]["tensor_file_bytes"] = (tmp / TENSOR_FILE).stat().st_size
        meta["tensor_file_sha256"] = _sha256_file(tmp / TENSOR_FILE)
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return Path(directory)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- load

def load_diff(directory: str | os.PathLike) -> TaskDiff:
    """Read a task diff saved by `save_diff`; every defect becomes a one-line DiffpruneError."""
    directory = Path(directory)
    if not directory.exists():
        raise DiffpruneError(f"diff directory not found: {directory}")
    if not directory.is_dir():
        raise DiffpruneError(f"{directory} is a file; give the directory that holds {CONFIG_FILE}")
    meta = _read_meta(directory)
    tensor_path = directory / TENSOR_FILE
    if not tensor_path.is_file():
        raise DiffpruneError(f"{tensor_path} is missing: the diff directory is incomplete")
    expected = meta.get("tensor_file_sha256")
    if expected is not None and _sha256_file(tensor_path) != expected:
        raise DiffpruneError(f"{tensor_path} is corrupt or truncated (its checksum does not match "
                             f"{CONFIG_FILE}); copy or create the diff again")
    try:
        tensors = safetensors.torch.load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DiffpruneError(f"{tensor_path} is corrupt or truncated ({msg})") from exc

    try:
        sparse_meta = dict(meta["tensors"]["sparse"])
        dense_meta = dict(meta["tensors"]["dense"])
        if meta["format_version"] == 1:
            sparse = layout.unpack_v1(tensors, sparse_meta, tensor_path, SparseDelta)
            value_dtype = "float32"
        else:
            sparse = layout.unpack_v2(tensors, sparse_meta, meta.get("coding"), tensor_path, SparseDelta)
            value_dtype = meta["coding"]["values"]["dtype"]
        dense: dict[str, torch.Tensor] = {}
        for name, info in dense_meta.items():
            dense[name] = _take(tensors, f"dense.{name}", tensor_path)
            if list(dense[name].shape) != list(info["shape"]):
                raise DiffpruneError(f"{tensor_path}: dense tensor '{name}' has shape "
                                     f"{list(dense[name].shape)}, {CONFIG_FILE} says {info['shape']}")
        if tensors:
            raise DiffpruneError(f"{tensor_path} holds tensors {CONFIG_FILE} does not list: "
                                 f"{', '.join(sorted(tensors)[:5])}")
        diff = TaskDiff(method=str(meta["method"]), base_model=str(meta["base_model"]), task=str(meta["task"]),
                        label_names=meta["label_names"], config=dict(meta["config"]), sparse=sparse,
                        dense=dense, extra=dict(meta.get("extra") or {}), fingerprint=meta.get("fingerprint"),
                        value_dtype=value_dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise DiffpruneError(f"{directory / CONFIG_FILE} is malformed (bad or missing field {exc})") from exc
    try:
        diff.validate()
    except DiffpruneError as exc:
        raise DiffpruneError(f"{directory} is inconsistent: {exc}") from exc
    if diff.fingerprint is None and meta.get("fingerprinted") and diff.fingerprint_names():
        raise DiffpruneError(f"{directory / CONFIG_FILE} has \"fingerprint\": null although the diff was saved "
                             "with one: the base-model check cannot be switched off by editing the file "
                             "(pass check_fingerprint=False in Python if you must)")
    if diff.fingerprint is None and "fingerprinted" not in meta and diff.fingerprint_names():
        logging.getLogger("diffprune").warning(
            "%s has no base-model fingerprint (saved before diffprune recorded whether it had one): it is "
            "applied without checking that the base model is the one it was trained on", directory)
    if diff.fingerprint is not None and not (isinstance(diff.fingerprint, str)
                                             and len(diff.fingerprint) == 64):
        raise DiffpruneError(f"{directory / CONFIG_FILE}: fingerprint {diff.fingerprint!r} is not a sha256 hex")
    return diff


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise DiffpruneError(f"{path} is missing: {directory} is not a diffprune task diff")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiffpruneError(f"{path} is not valid JSON ({exc}); the diff is corrupt") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DiffpruneError(f"{path} is not a diffprune task diff (format is not '{FORMAT_NAME}')")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise DiffpruneError(f"{directory} uses diff format version {version!r}; this diffprune reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade diffprune to read newer diffs)")
    return meta
