"""Task diffs: what one task adds to a shared base model, stored, checked, applied, reverted and merged.

A `TaskDiff` holds sparse additive diffs (`SparseDelta`, the diff-pruning δ) and dense replacement tensors
(the task head, BitFit biases), plus a fingerprint of the base weights it was trained on so that applying it
to the wrong pretrained model fails loudly instead of producing a quietly broken model.

- `format`: data model, `fingerprint`, atomic `save_diff`, strict `load_diff` (no pickle).
- `layout`: the tensors of each format version: 1 (int32 positions + float32 values, 8 bytes per nonzero)
  and 2, the compact default (deflated LEB128 gaps + values as float32/float16/bfloat16/int8 byte planes).
- `codec`: those codings, each decoder strict (a corrupt stream is a DiffpruneError, never a wrong diff).
- `apply`: `apply_diff` / `AppliedDiff.revert` (bit-exact) and `merge_diff` (a standalone checkpoint).
- `stats`: `diff_stats`, the numbers `inspect` shows (bytes per nonzero of each part).
- `compose`: `compose_diffs`, one diff from several of the same base (sum, linear, TIES, DARE).
- `switch`: `TaskSwitcher`, many diffs over one resident base model, switched in place in milliseconds.
"""
from .apply import AppliedDiff, apply_diff, check_diff, merge_diff
from .compose import compose_diffs
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
    "AppliedDiff", "CONFIG_FILE", "compose_diffs", "FORMAT_NAME", "FORMAT_VERSION", "SparseDelta", "TENSOR_FILE", "TaskDiff",
    "apply_diff", "check_diff", "diff_stats", "fingerprint", "layer_group", "load_diff", "merge_diff",
    "save_diff", "TaskSwitcher",
]
