"""Non-adaptive Diff Pruning (the magnitude-pruning baseline of Guo, Rush & Kim, ACL 2021).

Phases: `finetune` trains every diff-prunable parameter (all but the head by default; `include`/`exclude`
patterns as for diff-pruning) in place, together with the head. At its end δ = θ_ft − θ is formed over the
flat layout, the model's parameters are put back to θ exactly, δ is projected onto the L0 ball (the
round(t·d) entries of largest |δ| are kept, ties by lower index) and `fixed_mask` finetunes those entries
starting from the projected values. The stored diff is sparse (positions + values) plus the dense head.

`SparseFromFinetune` is shared with LT-SFT (`lt_sft.py`), which differs only in starting the fixed-mask
phase from δ = 0 at the selected positions (`reset_values = True`).

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method non-adaptive-diff-pruning --sparsity 0.005 --output-dir runs/rte-nadp
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.diff_vector import FixedMaskDiff
from ..core.projection import project_l0
from ..sparse_model import DeltaModel, layout_for, select_parameters
from ..storage import TaskDiff
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register
from .sparse import FixedMaskMixin, default_fixed_lr


@dataclass
class SparseFromFinetuneConfig(MethodConfig):
    sparsity: float = 0.005        # t: share of the diff-prunable entries kept, in (0, 1]
    finetune_epochs: float = 3.0   # epochs of the full finetuning phase (`epochs` is the fixed-mask phase)
    fixed_lr: float | None = None  # fixed-mask learning rate (None: lr / √sparsity, sparse.default_fixed_lr)
    include: list[str] = field(default_factory=list)  # patterns of parameters to diff-prune (default: all)
    exclude: list[str] = field(default_factory=list)  # patterns to leave frozen

    def __post_init__(self):
        super().__post_init__()
        self.check_sparsity(self.sparsity)
        self.check_positive(finetune_epochs=self.finetune_epochs)
        if self.fixed_lr is not None:
            self.check_positive(fixed_lr=self.fixed_lr)


class SparseFromFinetune(FixedMaskMixin, Method):
    """Finetune fully → keep the top-|θ_ft − θ| positions → reset to θ → fixed-mask finetuning."""
    config_class = SparseFromFinetuneConfig
    phases = ("finetune", "fixed_mask")
    reset_values = False  # True: the fixed-mask phase starts from δ = 0 (LT-SFT), else from the projected δ

    @classmethod
    def budget(cls, epochs: float) -> dict[str, float]:
        return {"finetune_epochs": epochs / 2, "epochs": epochs / 2}

    def __init__(self, config: SparseFromFinetuneConfig, model, head_names):
        super().__init__(config, model, head_names)
        self.names = select_parameters(model, head_names, config.include, config.exclude)
        self.layout = layout_for(model, self.names)
        self.delta_model: DeltaModel | None = None
        # θ: the pretrained values of the diff-prunable tensors, in their own dtype, restored bit-exactly.
        self.theta = [model.get_parameter(n).detach().clone() for n in self.names]

    def build_phase(self, phase: str) -> PhaseSpec:
        c = self.config
        if phase == "finetune":
            self.delta_model = None
            train = set(self.names) | set(self.head_names)
            for n, p in self.model.named_parameters():
                p.requires_grad_(n in train)
            body = [self.model.get_parameter(n) for n in self.names]
            groups = [ParamGroup("body", body, c.lr, c.weight_decay), self.head_group()]
            return PhaseSpec(phase, self.model, [g for g in groups if g.params], c.finetune_epochs)
        if phase == "fixed_mask":
            return self.fixed_mask_phase(c.fixed_lr or default_fixed_lr(c.lr, c.sparsity), c.epochs)
        raise ValueError(phase)

    @torch.no_grad()
    def finetuned_delta(self) -> torch.Tensor:
        """θ_ft − θ as one flat float32 vector over the layout (on the model's device)."""
        parts = []
        for name, theta in zip(self.names, self.theta):
            p = self.model.get_parameter(name)
            parts.append(p.detach().float().reshape(-1) - theta.to(p.device).float().reshape(-1))
        return torch.cat(parts)

    @torch.no_grad()
    def reset_to_pretrained(self) -> None:
        for name, theta in zip(self.names, self.theta):
            self.model.get_parameter(name).copy_(theta)

    def end_phase(self, phase: str) -> None:
        if phase != "finetune":
            return
        delta = self.finetuned_delta()
        self.reset_to_pretrained()
        idx, values = project_l0(delta, self.config.sparsity)
        self.phase_stats["finetune"] = {"nonzero_frac": float((delta != 0).float().mean()),
                                        "kept_abs_min": float(values.abs().min())}
        if self.reset_values:
            values = torch.zeros_like(values)
        self.set_fixed_mask(FixedMaskDiff(self.layout, idx, values))

    def restore(self, diff: TaskDiff) -> None:
        self.reset_to_pretrained()  # the snapshot is a diff over θ, never over a finetuned model
        super().restore(diff)


@register
class NonAdaptiveDiffPruning(SparseFromFinetune):
    name = "non-adaptive-diff-pruning"
    reset_values = False
