"""Task diffs: what one task adds to a shared base model, stored, checked, applied, reverted and merged.

A `TaskDiff` holds sparse additive diffs (`SparseDelta`, the diff-pruning δ) and dense replacement tensors
(the task head, BitFit biases), plus a fingerprint of the base weights it was trained on so that applying it
to the wrong pretrained model fails loudly instead of producing a quietly broken model.

- `format`: data model, `fingerprint`, atomic `save_diff`, strict `load_diff` (no pickle).
- `apply`: `apply_diff` / `AppliedDiff.revert` (bit-exact) and `merge_diff` (a standalone checkpoint).
- `stats`: `diff_stats`, the numbers `inspect` shows.
- `switch`: `TaskSwitcher`, many diffs over one resident base model, switched in place in milliseconds.
"""
from .apply import AppliedDiff, apply_diff, check_diff, merge_diff
from .format import (
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TENSOR_FILE,
    SparseDelta,
    TaskDiff,
    fingerprint,
    load_diff,
    save_diff,
)
from .stats import diff_stats, layer_group
from .switch import TaskSwitcher

__all__ = [
    "AppliedDiff", "CONFIG_FILE", "FORMAT_NAME", "FORMAT_VERSION", "SparseDelta", "TENSOR_FILE", "TaskDiff",
    "apply_diff", "check_diff", "diff_stats", "fingerprint", "layer_group", "load_diff", "merge_diff",
    "save_diff", "TaskSwitcher",
]
