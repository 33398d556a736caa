"""Last-layer finetuning (a baseline of Guo, Rush & Kim, ACL 2021): only the top transformer layer trains.

One phase, `finetune`: the parameters of the highest-numbered transformer block (`encoder.layer.N` for
BERT/RoBERTa, `transformer.layer.N` for DistilBERT, `transformer.h.N` for GPT-2; any `layer(s)/h/block.N`)
plus the task head train; embeddings, lower layers, pooler and final LayerNorm stay frozen. The stored diff
holds that layer and the head as dense replacement tensors.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method last-layer --lr 1e-4 --output-dir runs/rte-last-layer
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DiffpruneError
from .base import MethodConfig, register
from .full import FullFinetune

# `<...>.layer.N.`, `layers.N.`, `h.N.`, `block.N.` at a name-component boundary.
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\.")


def top_layer_names(names: list[str]) -> list[str]:
    """The names that belong to the highest-numbered transformer block (DiffpruneError if there is none)."""
    index = {}
    for name in names:
        match = _LAYER.search(name)
        if match:
            index[name] = int(match.group(1))
    if not index:
        raise DiffpruneError("last-layer: found no transformer layers (no parameter name contains "
                             "'layer.N.', 'layers.N.', 'h.N.' or 'block.N.')")
    top = max(index.values())
    return [n for n in names if index.get(n) == top]


@dataclass
class LastLayerConfig(MethodConfig):
    lr: float = 1e-4


@register
class LastLayer(FullFinetune):
    name = "last-layer"
    config_class = LastLayerConfig
    phases = ("finetune",)

    def __init__(self, config, model, head_names):
        super().__init__(config, model, head_names)
        head = set(self.head_names)
        self.layer_names = top_layer_names([n for n, _ in model.named_parameters() if n not in head])

    def trainable_names(self) -> list[str]:
        return self.layer_names + self.head_names
