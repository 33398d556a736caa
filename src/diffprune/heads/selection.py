"""Which heads to prune, from a (layers, heads) importance map: by count, fraction or threshold."""
from __future__ import annotations

import torch

from diffprune.errors import DiffpruneError




def select_heads_to_prune(scores: torch.Tensor, count: int | None = None, fraction: float | None = None,
                          threshold: float | None = None, group: int = 1) -> dict[int, list[int]]:
    """The least important heads of a (layers, heads) score map, as {layer: sorted heads}.

    Give exactly one of: `count` heads, a `fraction` of all heads (rounded to the nearest count), or every
    head scoring strictly below `threshold`. NaN scores (heads already pruned) are never selected; ties
    are broken by (layer, head) order so the choice is deterministic.

    `group` > 1 (grouped-query attention: query heads per key/value head): whole groups are chosen, since
    a query head can only go with its group. A group scores the mean of its query heads; `count` (in query
    heads) becomes round(count / group) groups; every query head of a chosen group is returned.
    """
    if group > 1:
        s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
        if s.dim() != 2 or s.shape[1] % group:
            raise DiffpruneError(f"head scores of shape {tuple(s.shape)} do not split into groups of {group}")
        grouped = s.view(s.shape[0], -1, group).mean(dim=2)  # a group with a pruned head is NaN: gone
        n = None if count is None else int(round(count / group)) if isinstance(count, int) else count
        chosen = select_heads_to_prune(grouped, n, fraction, threshold)
        return {layer: [g * group + j for g in gs for j in range(group)] for layer, gs in chosen.items()}
    given = [name for name, v in (("count", count), ("fraction", fraction), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise DiffpruneError("select heads to prune by exactly one of count, fraction or threshold "
                             f"(got {', '.join(given) or 'none'})")
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if scores.dim() != 2:
        raise DiffpruneError(f"head scores must be a (layers, heads) matrix, got shape {tuple(scores.shape)}")
    flat = scores.flatten()
    valid = torch.nonzero(~torch.isnan(flat)).flatten()
    order = valid[torch.argsort(flat[valid], stable=True)]  # least important first
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(valid):
            raise DiffpruneError(f"count must be an integer from 0 to {len(valid)} (the prunable heads), got {count!r}")
        chosen = order[:count]
    elif fraction is not None:
        if not 0.0 <= float(fraction) <= 1.0:
            raise DiffpruneError(f"fraction must be between 0 and 1, got {fraction!r}")
        chosen = order[:int(round(float(fraction) * len(valid)))]
    else:
        chosen = order[flat[order] < float(threshold)]
    n_heads = scores.shape[1]
    out: dict[int, list[int]] = {}
    for i in sorted(chosen.tolist()):
        out.setdefault(i // n_heads, []).append(i % n_heads)
    return out


__all__ = ["select_heads_to_prune"]
