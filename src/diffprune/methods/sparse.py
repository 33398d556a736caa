"""Shared machinery of the sparse methods: a fixed-mask diff, its training phase and its storage.

Diff Pruning's last phase, non-adaptive Diff Pruning and LT-SFT all end the same way: a fixed set of
positions of the pretrained tensors, one trainable value each, the rest frozen. This mixin holds that
state (`FixedMaskDiff` inside a `DeltaModel`), builds the phase, and converts to and from the stored
`TaskDiff` (per-tensor positions and values + the dense head).
"""
from __future__ import annotations

import math

import torch

from ..core.diff_vector import FixedMaskDiff
from ..sparse_model import DeltaModel
from ..storage import SparseDelta, TaskDiff
from .base import ParamGroup, PhaseSpec

def default_fixed_lr(lr: float, sparsity: float) -> float:
    """The fixed-mask learning rate of every sparse method when none is given: lr / √t.

    Adam moves each trained entry by about its learning rate per step whatever its gradient's scale, so
    dense finetuning over d entries at lr changes the weights by ~lr·√d per step (in L2 norm). A sparse
    diff trains t·d of them; at lr/√t its steps have the same norm, concentrated on the kept entries: 14×
    at 0.5%, 32× at 0.1%, 10× at 1%, lr itself at t = 1.
    """
    return lr / math.sqrt(sparsity)


class FixedMaskMixin:
    """Needs `self.model`, `self.layout`, `self.names`, `self.head_names`, `self.config`."""

    delta_model: DeltaModel | None

    def set_fixed_mask(self, source: FixedMaskDiff) -> None:
        self.delta_model = DeltaModel(self.model, source, self.head_names)

    def fixed_mask_phase(self, lr: float, epochs: float, name: str = "fixed_mask") -> PhaseSpec:
        source = self.delta_model.source
        groups = [ParamGroup("diff", [source.values], lr, self.config.weight_decay), self.head_group()]
        return PhaseSpec(name, self.delta_model, groups, epochs, checkpoint_prefixes=(DeltaModel.SOURCE,))

    def eval_model(self):
        return self.delta_model if self.delta_model is not None else self.model

    def export(self) -> TaskDiff:
        source = self.delta_model.source
        if not isinstance(source, FixedMaskDiff):
            raise RuntimeError("export() is only defined once the mask is fixed")
        sparse = {}
        for i, local, values in source.per_tensor():
            name = self.layout.names[i]
            sparse[name] = SparseDelta(tuple(self.layout.shapes[i]), local.detach().clone(),
                                       values.detach().float().clone())
        # Every diff-pruned tensor with its size, stored or not: a tensor left entirely at zero has no
        # sparse entry, and the report counts such untouched groups (the paper's Table 3).
        diff_tensors = dict(zip(self.layout.names, self.layout.numels))
        return TaskDiff(method=self.name, base_model="", task="", label_names=None,
                        config=self.config.to_dict(), sparse=sparse, dense=self.head_state(),
                        extra={"num_diff_params": self.layout.total, "diff_param_names": self.names,
                               "diff_tensors": diff_tensors})

    def restore(self, diff: TaskDiff) -> None:
        idx, vals = flat_positions(diff, self.layout)
        self.set_fixed_mask(FixedMaskDiff(self.layout, idx, vals))
        self.load_head(diff.dense)


def flat_positions(diff: TaskDiff, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored diff's entries as flat positions of `layout` (ascending tensor order) and their values.

    The stored format keeps positions per tensor (so a diff does not depend on which other tensors a
    run gated); training works on one flat index over the layout. Raises ValueError when the diff holds
    a tensor the layout does not have (another model, or include/exclude patterns that differ).
    """
    offsets = dict(zip(layout.names, layout.offsets))
    unknown = sorted(set(diff.sparse) - set(offsets))
    if unknown:
        raise ValueError(f"the diff holds tensors outside this layout: {unknown[:3]}")
    parts = sorted(((offsets[n], sd) for n, sd in diff.sparse.items()), key=lambda t: t[0])
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return (torch.cat([sd.indices.long() + off for off, sd in parts]),
            torch.cat([sd.values.float() for _, sd in parts]))
