"""Head pruning alone (`--method head-pruning`): importance → real head removal → full or LoRA finetuning.

Steps 1 and 2 of Prune-LoRA (see `prune_lora.py`, which holds the shared machinery), followed by ordinary
full finetuning (`finetune: "full"`, the default) or uniform-rank LoRA (`finetune: "lora"`): the ablation
that shows what the pruning alone costs.

    diffprune train ... --method head-pruning --set finetune=lora --set prune_count=36
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DiffpruneError
from .base import Method, MethodConfig, register
from .full import FullFinetune
from .lora import LoRA, LoRAConfig
from .prune_lora import FINETUNE_MODES, LoRAOptions, PrunedMethod, adaptable_modules


@dataclass
class HeadPruningConfig(LoRAOptions):
    finetune: str = "full"  # after pruning: "full" (every remaining parameter) or "lora" (uniform rank)
    # None: the default of the matching unpruned method, so head-pruning is exactly its ablation:
    # full 5e-5 / 0.0 (full.py), lora 5e-4 / 0.1 (lora.py)
    lr: float | None = None
    weight_decay: float | None = None
    rank: int = 8                  # LoRA rank of every adapted matrix (finetune "lora" only)
    train_layernorm: bool = False  # finetune "lora" only, as in the plain lora method

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise DiffpruneError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {self.finetune!r}")
        full = self.finetune == "full"
        if self.lr is None:
            self.lr = MethodConfig.lr if full else LoRAConfig.lr
        if self.weight_decay is None:
            self.weight_decay = MethodConfig.weight_decay if full else LoRAConfig.weight_decay
        super().__post_init__()
        if not full:
            self.lora_config(self.rank)  # validates rank, alpha, dropout, targets, init



@register
class HeadPruning(PrunedMethod):
    """Importance-oriented head pruning, then full finetuning or uniform-rank LoRA."""
    name = "head-pruning"
    config_class = HeadPruningConfig

    def _build_inner(self) -> Method:
        c: HeadPruningConfig = self.config
        if c.finetune == "full":
            inner = MethodConfig(lr=c.lr, head_lr=c.head_lr, weight_decay=c.weight_decay, epochs=c.epochs)
            return FullFinetune(inner, self.model, self.head_names)
        modules = adaptable_modules(self.model, c.targets)
        if not modules:
            raise DiffpruneError("head-pruning: every head was pruned, so LoRA has nothing to adapt")
        self.layout = {"lora_targets": modules, "rank_pattern": {}}
        return LoRA(c.lora_config(c.rank, modules), self.model, self.head_names)

    @classmethod
    def _stored_lora(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("finetune", "full") != "lora":
            return None
        known = {k: v for k, v in config.items() if k in HeadPruningConfig.__dataclass_fields__}
        c = HeadPruningConfig.from_dict(known)
        return c.lora_config(c.rank, config["lora_targets"]).to_dict()


__all__ = ["HeadPruning", "HeadPruningConfig"]
