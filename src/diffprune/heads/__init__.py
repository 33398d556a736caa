"""Attention heads: task-oriented importance (Michel et al. 2019) and real head pruning by weight surgery.

Prune-LoRA's first two steps (docs METHODS.md): score every head on a sample of the task's training data
(`importance.py`), then remove the least important ones by weight surgery on any family `diffprune.archs` describes
(`surgery.py`; grouped-query attention loses whole key/value groups).

    scores = head_importance(model, batches)                      # (layers, heads), rows of unit L2 norm
    prune_heads(model, select_heads_to_prune(scores, fraction=0.3))
    model.save_pretrained(out); model = load_pruned(out)
"""
from diffprune.heads.importance import (HeadImportance, head_importance, head_masks, importance_sums,
                                        load_importance, plot_importance, run_importance, save_importance)
from diffprune.heads.surgery import (CONFIG_KEY, ZeroHeadAttention, count_parameters, get_arch,
                                     load_pruned, prune_heads, pruned_heads_of, reapply_pruning,
                                     select_heads_to_prune)

__all__ = ["head_importance", "head_masks", "importance_sums", "HeadImportance", "save_importance",
           "load_importance", "plot_importance", "run_importance", "prune_heads", "reapply_pruning",
           "load_pruned", "select_heads_to_prune", "pruned_heads_of", "count_parameters", "get_arch",
           "ZeroHeadAttention", "CONFIG_KEY"]
