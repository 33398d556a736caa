"""Projection of a diff onto the L0 ball: keep exactly k entries, chosen by magnitude.

After the L0 phase the paper keeps the t·d entries of δ with the largest |δ| (global over every
diff-pruned tensor) and zeroes the rest, which fixes the mask for the last phase. Two details matter:

* the count must be exact, also when fewer than k entries of δ are nonzero (the L0 phase may already have
  gone below the target); a plain threshold at the k-th value would then be 0 and keep everything;
* ties must be broken deterministically, so the same δ always gives the same mask. We break them by an
  optional secondary score (higher first; Diff Pruning passes the gates' P(z > 0), so among entries whose
  δ is exactly zero the ones the L0 phase was least sure to close are kept), then by lower index.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def num_to_keep(total: int, sparsity: float) -> int:
    """k = round(t · d), at least 1: the number of entries a target density t keeps out of d."""
    if not (0.0 < sparsity <= 1.0):
        raise ValueError(f"sparsity (the share of entries kept) must be in (0, 1], got {sparsity}")
    if total <= 0:
        raise ValueError("nothing to project: the diff has no entries")
    return max(1, min(total, int(math.floor(sparsity * total + 0.5))))


def topk_indices(scores: Tensor, k: int, tiebreak: Tensor | None = None) -> Tensor:
    """Sorted flat indices of exactly k largest `scores` (1-D), ties by `tiebreak` then index.

    Ties can be most of the vector: when the L0 phase leaves fewer than k nonzeros, every zero of δ ties
    at the k-th value. The ties are therefore never listed whole (an int64 index per entry, then a sort,
    would be ~24 bytes per diff-pruned parameter: gigabytes for BERT-large); the tie-break is the same
    selection applied once more to the tiebreak scores of the tied entries, and equal ones go by index.
    """
    if scores.dim() != 1:
        raise ValueError("scores must be 1-D")
    n = scores.numel()
    if not (0 < k <= n):
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return torch.arange(n, device=scores.device)
    kth = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > kth).squeeze(1)  # fewer than k entries
    need = k - above.numel()
    tied = scores == kth
    if tiebreak is not None and int(tied.sum()) > need:
        ties = topk_indices(tiebreak.masked_fill(~tied, float("-inf")), need)
    else:
        ties = _first_true(tied, need)
    return torch.sort(torch.cat([above, ties])).values


def _first_true(mask: Tensor, count: int, chunk: int = 1 << 22) -> Tensor:
    """The `count` lowest positions where `mask` is True, listed chunk by chunk (bounded memory)."""
    found, have = [], 0
    for start in range(0, mask.numel(), chunk):
        if have >= count:
            break
        hits = torch.nonzero(mask[start:start + chunk]).squeeze(1)[: count - have] + start
        found.append(hits)
        have += hits.numel()
    return torch.cat(found) if found else mask.new_zeros(0, dtype=torch.long)


def project_l0(delta: Tensor, sparsity: float, tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep the round(t·d) largest-|δ| entries of a flat diff: returns (sorted indices, their values)."""
    flat = delta.detach().reshape(-1)
    k = num_to_keep(flat.numel(), sparsity)
    idx = topk_indices(flat.abs(), k, tiebreak)
    return idx, flat[idx].clone()
