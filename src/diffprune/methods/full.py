"""Full finetuning (every parameter), the reference every other method is compared to.

What it stores per task is the whole finetuned model (as dense replacement tensors), which is the point
of comparison for storage: d parameters per task instead of t·d.
"""
from __future__ import annotations

from ..storage import TaskDiff
from .base import Method, MethodConfig, ParamGroup, PhaseSpec, register


@register
class FullFinetune(Method):
    name = "full"
    config_class = MethodConfig
    phases = ("finetune",)

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def build_phase(self, phase: str) -> PhaseSpec:
        names = set(self.trainable_names())
        body, head = [], []
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                (head if n in self.head_names else body).append(p)
        c = self.config
        groups = [ParamGroup("body", body, c.lr, c.weight_decay), self.head_group()]
        return PhaseSpec(phase, self.model, [g for g in groups if g.params], c.epochs)

    def export(self) -> TaskDiff:
        dense = {n: self.model.get_parameter(n).detach().clone() for n in self.trainable_names()}
        return TaskDiff(method=self.name, base_model="", task="", label_names=None,
                        config=self.config.to_dict(), sparse={}, dense=dense, extra={})

    def restore(self, diff: TaskDiff) -> None:
        for name, value in diff.dense.items():
            self.model.get_parameter(name).data.copy_(value)
