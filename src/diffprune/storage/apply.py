"""Applying a task diff to a base model, reverting it exactly, and merging it into a standalone checkpoint.

Every check (names, shapes, tied aliases, fingerprint) runs before the first weight is touched, so a
rejected diff leaves the model exactly as it was. Revert restores saved original values instead of
subtracting the diff: float addition is not invertible (x + d - d != x in general), and reverting must give
back the base model bit for bit so several task diffs can be swapped on one resident model.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import DiffpruneError
from ..io import _umask, atomic_write_json
from .format import TaskDiff, _get_parameter, atomic_directory, fingerprint


@dataclass(eq=False)
class AppliedDiff:
    """Handle returned by `apply_diff`: `revert()` puts the touched values back exactly.

    Also a context manager: ``with apply_diff(model, diff): ...`` reverts on exit.
    """

    model: torch.nn.Module
    diff: TaskDiff
    # (parameter, flat positions on its device, original values there) for sparse entries
    _sparse_saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (parameter, original full value) for dense entries
    _dense_saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    reverted: bool = False

    def revert(self) -> None:
        """Restore every touched value to what it was before `apply_diff`; a second call does nothing."""
        if self.reverted:
            return
        with torch.no_grad():
            for param, original in reversed(self._dense_saved):
                param.copy_(original)
            for param, idx, original in reversed(self._sparse_saved):
                _flat_set(param, idx, original)
        self.reverted = True

    def __enter__(self) -> "AppliedDiff":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def _flat_get(param: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if param.is_contiguous():
        return param.view(-1)[idx]
    return param[torch.unravel_index(idx, param.shape)]


def _flat_set(param: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    if param.is_contiguous():
        param.view(-1)[idx] = values
    else:
        param[torch.unravel_index(idx, param.shape)] = values


def check_diff(model: torch.nn.Module, diff: TaskDiff, check_fingerprint: bool = True) -> None:
    """Every check `apply_diff` makes, without modifying anything (raises DiffpruneError)."""
    diff.validate()
    names = list(diff.sparse) + list(diff.dense)
    missing = [n for n in names if _get_parameter(model, n) is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DiffpruneError(f"the model has no parameter(s) {shown} named in the diff; load the base model "
                             f"'{diff.base_model}' it was trained on")
    seen: dict[int, str] = {}
    for name in names:
        param = model.get_parameter(name)
        if id(param) in seen:  # two aliases of one tied tensor: applying both would touch it twice
            raise DiffpruneError(f"'{seen[id(param)]}' and '{name}' are the same tied tensor; a diff may name "
                                 "it only once")
        seen[id(param)] = name
        want = diff.sparse[name].shape if name in diff.sparse else tuple(diff.dense[name].shape)
        if tuple(param.shape) != tuple(want):
            raise DiffpruneError(f"shape mismatch for '{name}': the diff has {list(want)}, the model "
                                 f"{list(param.shape)}; load the base model '{diff.base_model}' it was trained on")
    if check_fingerprint and diff.fingerprint is not None:
        got = fingerprint(model, diff.fingerprint_names())
        if got != diff.fingerprint:
            raise DiffpruneError(
                f"this diff was made for a base model with fingerprint {diff.fingerprint[:12]}…; the model you "
                f"gave has {got[:12]}… (different pretrained weights) — load the base model "
                f"'{diff.base_model}' it was trained on")


def apply_diff(model: torch.nn.Module, diff: TaskDiff, check_fingerprint: bool = True) -> AppliedDiff:
    """Apply `diff` to `model` in place and return a handle that can revert it exactly.

    Sparse entries are added at their positions (in float32, then cast to the parameter's dtype); dense
    entries replace the whole tensor. Names are resolved with `model.get_parameter`, so a tensor tied to
    several modules is touched once.
    """
    check_diff(model, diff, check_fingerprint)
    applied = AppliedDiff(model, diff)
    try:
        with torch.no_grad():
            for name, delta in diff.sparse.items():
                param = model.get_parameter(name)
                idx = delta.indices.to(device=param.device, dtype=torch.int64)
                original = _flat_get(param, idx).clone()
                applied._sparse_saved.append((param, idx, original))
                new = original.float() + delta.values.to(device=param.device, dtype=torch.float32)
                _flat_set(param, idx, new.to(param.dtype))
            for name, value in diff.dense.items():
                param = model.get_parameter(name)
                applied._dense_saved.append((param, param.detach().clone()))
                param.copy_(value.to(device=param.device, dtype=param.dtype))
    except BaseException:
        applied.revert()  # never leave a half-applied diff behind
        raise
    return applied


MERGED_MARKER = "diffprune_merged.json"


def is_merged_model(path: Path) -> bool:
    """Whether `path` is a merged model written by `merge_diff` (the only folders merge may replace)."""
    try:
        return json.loads((Path(path) / MERGED_MARKER).read_text()).get("format") == "diffprune-merged-model"
    except (OSError, ValueError, AttributeError):
        return False


def check_merge_output(out: Path, base: str, base_dir: Path) -> None:
    """`merge` writes only to a new or empty folder or over an earlier merged model, never the base."""
    out = Path(out)
    if base_dir.is_dir() and out.exists() and out.resolve() in (base_dir.resolve(), *base_dir.resolve().parents):
        raise DiffpruneError(f"--output {out} is (or holds) the base model {base}; merge into another folder")
    if out.exists() and not out.is_dir():
        raise DiffpruneError(f"--output {out} is an existing file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not is_merged_model(out):
        raise DiffpruneError(f"refusing to replace {out}: it is not a merged model made by diffprune merge; "
                             "choose another --output or remove it yourself")


def _keep_label_count(config_file: Path, config) -> None:
    """Write id2label/label2id into a saved config.json when save_pretrained left them out.

    transformers 5 omits them when they look like the defaults (LABEL_0, LABEL_1, …); a model class whose
    own default label count differs (BART: 3) then reloads with a head of the wrong size and refuses the
    checkpoint. Written explicitly, the label count survives for every family.
    """
    saved = json.loads(config_file.read_text())
    if "id2label" in saved:
        return
    saved["id2label"] = {str(i): n for i, n in config.id2label.items()}
    saved["label2id"] = {n: int(i) for n, i in config.label2id.items()}
    atomic_write_json(config_file, saved)


def merge_diff(model: torch.nn.Module, diff: TaskDiff, output_dir: str | os.PathLike, tokenizer=None,
               fold: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Path:
    """Apply `diff` and save the result as a plain transformers checkpoint in `output_dir` (atomically).

    The saved config carries id2label/label2id from the diff's label names (problem_type "regression" when
    there are none, or `extra["problem_type"]` when given), so `AutoModelForSequenceClassification
    .from_pretrained(output_dir)` (`AutoModelForQuestionAnswering` for a QA diff) needs nothing else. On success `model` is left merged (config included),
    ready to use; on failure it is restored and nothing is left on disk. `fold` turns a model with added
    modules (LoRA layers) into a plain one after the diff is applied (the method's `fold`).
    """
    if diff.label_names is not None and len(diff.label_names) != model.config.num_labels:
        raise DiffpruneError(f"the diff has {len(diff.label_names)} labels but the model's head has "
                             f"{model.config.num_labels}; build the model with num_labels="
                             f"{len(diff.label_names)}")
    applied = apply_diff(model, diff)
    cfg = model.config  # submodules share this object, so it is restored in place, not swapped
    old = {k: copy.deepcopy(getattr(cfg, k, None)) for k in ("id2label", "label2id", "problem_type")}
    try:
        if diff.label_names is not None:
            model.config.id2label = {i: n for i, n in enumerate(diff.label_names)}
            model.config.label2id = {n: i for i, n in enumerate(diff.label_names)}
        classification = diff.extra.get("task_kind", "classification") == "classification"  # not QA
        problem_type = diff.extra.get("problem_type") or (
            "regression" if diff.label_names is None and classification else None)
        if problem_type:
            model.config.problem_type = problem_type
        plain = fold(model) if fold is not None else model
        with atomic_directory(output_dir, is_merged_model) as tmp:
            plain.save_pretrained(tmp)
            _keep_label_count(tmp / "config.json", plain.config)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            mode = 0o666 & ~_umask()  # save_pretrained's safetensors files are created 0600
            for file in tmp.rglob("*"):
                if file.is_file():
                    os.chmod(file, mode)
            atomic_write_json(tmp / MERGED_MARKER, {"format": "diffprune-merged-model", "method": diff.method,
                                                     "task": diff.task, "base_model": diff.base_model,
                                                     "fingerprint": diff.fingerprint})
    except BaseException:
        for key, value in old.items():
            setattr(cfg, key, value)
        applied.revert()
        raise
    return Path(output_dir)
