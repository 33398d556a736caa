"""Last-layer finetuning (a baseline of Guo, Rush & Kim, ACL 2021): only the top transformer layer trains.

One phase, `finetune`: the parameters of the top transformer layer plus the task head train; embeddings,
lower layers, pooler and final norm stay frozen. The layers come from `diffprune.archs` (BERT's
`encoder.layer.N`, GPT-2's `h.N`, Llama's `layers.N`, …); in an encoder-decoder the top layer is the
decoder's last one, the layer the classification head reads, so exactly one layer trains there too. The
stored diff holds that layer and the head as dense replacement tensors.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method last-layer --lr 1e-4 --output-dir runs/rte-last-layer
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..archs import describe
from ..errors import DiffpruneError
from .base import MethodConfig, register
from .full import FullFinetune


def top_layer_names(model: nn.Module, exclude: set[str] = frozenset()) -> list[str]:
    """Parameter names of the model's last transformer layer (the decoder's, in an encoder-decoder)."""
    top = describe(model).layers[-1]
    names = [n for n, _ in model.named_parameters() if n.startswith(top.name + ".") and n not in exclude]
    if not names:
        raise DiffpruneError(f"last-layer: the top layer {top.name} has no parameters of its own")
    return names


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
        self.layer_names = top_layer_names(model, set(self.head_names))

    def trainable_names(self) -> list[str]:
        return self.layer_names + self.head_names
