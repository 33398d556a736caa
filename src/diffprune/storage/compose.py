"""Composing task diffs made on one base model: add them (a language diff + a task diff) or merge task diffs.

Methods, with the semantics of PEFT's `add_weighted_adapter` combination types, computed per tensor:

* ``sum``: δ = Σ δ_i (plain addition; the positions are the union of the inputs' positions).
* ``linear``: δ = Σ w_i δ_i (PEFT's task arithmetic).
* ``ties``: trim each δ_i to its top `density` share by magnitude, elect each position's sign (the sign of
  Σ of the trimmed δ_i), and take the mean of the weighted entries that agree with it (disjoint merge).
* ``dare``: drop each entry of δ_i with probability 1 - `density` and rescale the kept ones by 1/density,
  then Σ w_i δ_i (PEFT's dare_linear); ``dare_ties`` does the drop, then TIES' sign election and mean.

Everything runs on the sparse entries: for each tensor the union of the inputs' positions is gathered into
a small (diffs × positions) matrix, so no full model is ever densified. Entries outside every input's
positions are zero in each δ_i and stay zero in every method, so the result equals the dense computation.
`density` counts each diff's stored nonzeros in the tensor, not the tensor's elements: PEFT counts
elements because its task tensors are dense, and on a 0.5% diff a share of the elements would trim nothing.
DARE draws from a `torch.Generator` seeded with `seed` (diffs in the given order, tensors by name), so a
composition is reproducible and never touches the global RNG.

Dense entries (task heads, BitFit biases) are replacement values, not differences, so no method merges them
(averaging two separately trained heads is not a head). A tensor that several diffs replace with different
values is refused unless `head_from` names the diff to take all such tensors from; a tensor that is sparse
in one diff and dense in another is always refused. The result's task, labels and method are those of
`head_from` (else of the first diff with dense entries, else the first diff), so eval and merge take it.

Diffs of different base models are refused through their fingerprints: with `base_model` every diff is
checked against it and the result fingerprinted on it; without it, only diffs fingerprinted over the same
tensors as the result can be checked, and anything else asks for the base model.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import DiffpruneError
from .format import SparseDelta, TaskDiff, fingerprint

METHODS = ("sum", "linear", "ties", "dare", "dare_ties")


def compose_diffs(diffs: Sequence[TaskDiff], method: str = "sum", weights: Sequence[float] | None = None,
                  density: float | None = None, seed: int = 0, head_from: int | None = None,
                  base_model: torch.nn.Module | None = None, labels: Sequence[str] | None = None,
                  majority_sign_method: str = "total") -> TaskDiff:
    """One diff from `diffs` (all made on the same base); see the module docstring for the methods.

    `weights` (one per diff, default 1) apply to linear, ties, dare and dare_ties; `density` (0 < d <= 1)
    is required by ties, dare and dare_ties; `head_from` is the index of the diff whose dense tensors win;
    `labels` name the diffs in messages (paths, say). Raises DiffpruneError for anything it refuses.
    """
    diffs = list(diffs)
    labels = list(labels) if labels is not None else [f"diff {i + 1}" for i in range(len(diffs))]
    weights, dense, primary = check_composable(diffs, method, weights, density, head_from, labels,
                                               majority_sign_method)
    _check_bases(diffs, labels, base_model)

    gen = torch.Generator().manual_seed(int(seed))
    sparse: dict[str, SparseDelta] = {}
    for name in sorted(set().union(*(d.sparse for d in diffs))):
        present = [(i, d.sparse[name]) for i, d in enumerate(diffs) if name in d.sparse]
        merged = _merge_tensor(present, weights, method, density, gen, majority_sign_method)
        if merged.nnz:
            sparse[name] = merged

    first = diffs[primary]
    config = dict(first.config)
    fp_dense = sorted({n for d in diffs for n in d.config.get("fingerprint_dense", []) or []} & set(dense))
    config.pop("fingerprint_dense", None)
    if fp_dense:
        config["fingerprint_dense"] = fp_dense
    extra = dict(first.extra)
    recorded = {d.extra.get("num_diff_params") for d in diffs}
    if len(recorded) != 1:  # inputs diff-pruned different parameter sets: d is read from the stored shapes
        extra.pop("num_diff_params", None)
    extra["composed"] = {
        "method": method, "weights": weights, "density": density,
        "seed": int(seed) if method.startswith("dare") else None,
        "head_from": labels[head_from] if head_from is not None else None,
        "inputs": [{"name": lab, "task": d.task, "method": d.method, "nnz": d.nnz, "fingerprint": d.fingerprint}
                   for lab, d in zip(labels, diffs)]}
    result = TaskDiff(method=first.method, base_model=first.base_model, task=first.task,
                      label_names=first.label_names, config=config, sparse=sparse, dense=dense, extra=extra)
    result.fingerprint = _result_fingerprint(result, diffs, base_model)
    return result


# --------------------------------------------------------------------------------------------- checks

def check_composable(diffs, method="sum", weights=None, density=None, head_from=None, labels=None,
                     majority_sign_method="total"):
    """Every check of `compose_diffs` that needs no base model (the CLI runs it before loading one);
    returns (weights, dense entries of the result, index of the diff whose task and labels it takes)."""
    diffs = list(diffs)
    labels = list(labels) if labels is not None else [f"diff {i + 1}" for i in range(len(diffs))]
    weights = _check_options(diffs, method, weights, density, head_from, labels, majority_sign_method)
    _check_bases(diffs, labels, None)
    dense, primary = _dense_part(diffs, labels, head_from)
    _check_names(diffs, labels, dense)
    return weights, dense, primary


def _check_options(diffs, method, weights, density, head_from, labels, sign_method) -> list[float]:
    if method not in METHODS:
        raise DiffpruneError(f"unknown composition method '{method}' (known: {', '.join(METHODS)})")
    if len(diffs) < 2:
        raise DiffpruneError(f"compose needs at least two diffs, got {len(diffs)}")
    if len(labels) != len(diffs):
        raise DiffpruneError(f"{len(labels)} labels for {len(diffs)} diffs")
    if sign_method not in ("total", "frequency"):
        raise DiffpruneError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    if method == "sum" and weights is not None:
        raise DiffpruneError("method 'sum' adds the diffs as they are; use --method linear for --weights")
    weights = [1.0] * len(diffs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(diffs):
        raise DiffpruneError(f"{len(weights)} weights for {len(diffs)} diffs; give one weight per diff")
    if not all(math.isfinite(w) for w in weights):
        raise DiffpruneError(f"weights must be finite numbers, got {weights}")
    if method in ("sum", "linear"):
        if density is not None:
            raise DiffpruneError(f"method '{method}' keeps every entry; --density is for ties, dare and dare_ties")
    elif density is None or not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise DiffpruneError(f"method '{method}' needs a density in (0, 1] (the share of each diff's nonzeros "
                             f"kept), got {density!r}")
    if head_from is not None and not (isinstance(head_from, int) and 0 <= head_from < len(diffs)):
        raise DiffpruneError(f"head_from must be the index of one of the {len(diffs)} diffs, got {head_from!r}")
    for lab, d in zip(labels, diffs):
        d.validate()
        if d.config.get("fingerprint_base"):
            raise DiffpruneError(f"{lab} is a {d.method} diff: it adds modules to the base model, and compose "
                                 "takes diffs that only add to or replace base tensors (sparse methods, BitFit, "
                                 "full finetuning, the last layer)")
    return weights


def _check_bases(diffs, labels, base_model) -> None:
    """Refuse diffs of different base models (before the slow part)."""
    if base_model is not None:
        for lab, d in zip(labels, diffs):
            names = d.fingerprint_names()
            if d.fingerprint is not None and names and fingerprint(base_model, names) != d.fingerprint:
                raise DiffpruneError(f"{lab} was made on another base model (fingerprint {d.fingerprint[:12]}…) "
                                     f"than the base model given ('{diffs[0].base_model}'); compose diffs of "
                                     "one base model only")
        return
    seen: dict[tuple, tuple[str, str]] = {}
    for lab, d in zip(labels, diffs):
        if d.fingerprint is None:
            continue
        key = tuple(d.fingerprint_names())
        if key in seen and seen[key][1] != d.fingerprint:
            raise DiffpruneError(f"{seen[key][0]} and {lab} were made on different base models (their "
                                 "fingerprints differ); compose diffs of one base model only")
        seen.setdefault(key, (lab, d.fingerprint))


def _dense_part(diffs, labels, head_from) -> tuple[dict[str, torch.Tensor], int]:
    owners: dict[str, list[int]] = {}
    for i, d in enumerate(diffs):
        for name in d.dense:
            owners.setdefault(name, []).append(i)
    dense = {}
    for name, who in sorted(owners.items()):
        first = diffs[who[0]].dense[name]
        same = all(diffs[j].dense[name].shape == first.shape and torch.equal(diffs[j].dense[name], first)
                   for j in who[1:])
        if same:
            dense[name] = first
        elif head_from is not None and head_from in who:
            dense[name] = diffs[head_from].dense[name]
        elif head_from is not None:  # several replace it and the chosen diff does not: no rule picks one
            raise DiffpruneError(f"{' and '.join(labels[j] for j in who)} replace '{name}' with different values "
                                 f"and the diff to take it from ({labels[head_from]}) does not carry it")
        else:
            raise DiffpruneError(f"{' and '.join(labels[j] for j in who)} both replace '{name}' (a dense tensor, "
                                 "e.g. the task head) with different values, and replacements are not merged; "
                                 "say which diff to take it from (--head-from / head_from)")
    if head_from is not None:
        return dense, head_from
    with_dense = [i for i, d in enumerate(diffs) if d.dense]
    return dense, (with_dense[0] if with_dense else 0)


def _check_names(diffs, labels, dense) -> None:
    shapes: dict[str, tuple[tuple, str]] = {}
    for lab, d in zip(labels, diffs):
        for name, delta in d.sparse.items():
            if name in dense:
                raise DiffpruneError(f"'{name}' is a sparse diff in {lab} but replaced whole (dense) in another "
                                     "diff; an addition and a replacement of one tensor do not compose")
            if name in shapes and shapes[name][0] != delta.shape:
                raise DiffpruneError(f"'{name}' has shape {list(delta.shape)} in {lab} but "
                                     f"{list(shapes[name][0])} in {shapes[name][1]}: not the same base model")
            shapes.setdefault(name, (delta.shape, lab))


def _result_fingerprint(result: TaskDiff, diffs, base_model) -> str | None:
    names = result.fingerprint_names()
    if base_model is not None:
        return fingerprint(base_model, names) if names else None
    prints = [d for d in diffs if d.fingerprint is not None]
    if not prints:
        return None
    if all(d.fingerprint_names() == names for d in prints):  # _check_bases made them equal
        return prints[0].fingerprint
    raise DiffpruneError("the diffs are fingerprinted over different tensors, so their base models can only be "
                         "compared on the base model itself: pass base_model= (the unmodified base)")


# --------------------------------------------------------------------------------------------- merging

def _merge_tensor(present, weights, method, density, gen, sign_method) -> SparseDelta:
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, task_arithmetic

    shape = present[0][1].shape
    union = torch.unique(torch.cat([d.indices.long() for _, d in present]), sorted=True)
    rows = []
    for i, delta in present:
        values = delta.values.float()
        if method == "ties" and values.numel() and density < 1:
            values = prune(values, density, method="magnitude")  # top share of this diff's own entries
        elif method in ("dare", "dare_ties") and values.numel() and density < 1:
            keep = torch.rand(values.numel(), generator=gen) < density
            values = values * keep / density
        row = torch.zeros(union.numel(), dtype=torch.float32)
        row[torch.searchsorted(union, delta.indices.long())] = values
        rows.append(row)
    w = torch.tensor([weights[i] for i, _ in present], dtype=torch.float32)
    if method in ("sum", "linear", "dare"):
        merged = task_arithmetic(rows, w)
    else:
        stacked = torch.stack(rows)
        mask = calculate_majority_sign_mask(stacked, method=sign_method)
        merged = disjoint_merge(stacked * w[:, None], mask)
    keep = merged != 0  # an exact cancellation or a dropped entry is no nonzero
    return SparseDelta(shape, union[keep], merged[keep].contiguous())
