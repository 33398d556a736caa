"""BitFit (Ben Zaken, Ravfogel & Goldberg, 2021): train only the bias terms of the pretrained model.

One phase, `finetune`: every parameter whose name ends with `.bias` (attention, feed-forward and LayerNorm
biases alike) plus the task head train; everything else stays frozen. The stored diff holds the trained
biases and the head as dense replacement tensors. The biases are replaced wholesale, so they do not depend
on the base values and are not fingerprinted (`config["fingerprint_dense"]` is not set).

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method bitfit --lr 1e-3 --output-dir runs/rte-bitfit
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffpruneError
from .base import MethodConfig, register
from .full import FullFinetune


@dataclass
class BitFitConfig(MethodConfig):
    lr: float = 1e-3  # biases want a much larger learning rate than full finetuning (paper: 1e-4 … 1e-3)


@register
class BitFit(FullFinetune):
    name = "bitfit"
    config_class = BitFitConfig
    phases = ("finetune",)

    def __init__(self, config, model, head_names):
        super().__init__(config, model, head_names)
        head = set(self.head_names)
        self.bias_names = [n for n, _ in model.named_parameters() if n.endswith(".bias") and n not in head]
        if not self.bias_names:
            raise DiffpruneError(f"bitfit: the model has no bias parameters outside the task head, so BitFit has "
                                 f"nothing to train ({getattr(model.config, 'model_type', 'this family')} is built "
                                 "without biases, as Llama, ModernBERT and T5 are); use lora or diff-pruning")

    def trainable_names(self) -> list[str]:
        return self.bias_names + self.head_names
