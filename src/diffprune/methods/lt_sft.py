"""LT-SFT, Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen & Vulić, 2021, "Composable Sparse
Fine-Tuning for Cross-Lingual Transfer").

Same two phases as non-adaptive Diff Pruning (`non_adaptive.py`): finetune fully, select the round(t·d)
parameters with the largest |θ_ft − θ|, reset the model to θ, then finetune again with only those
positions trainable — but that second phase starts from δ = 0 at the selected positions (the pretrained
values) instead of the projected finetuned values. The head stays as finetuned in the first phase and keeps
training densely. The result δ = θ_task − θ is sparse, and sparse diffs compose by addition.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue \
        --method lt-sft --sparsity 0.005 --output-dir runs/rte-lt-sft
"""
from __future__ import annotations

from .base import register
from .non_adaptive import SparseFromFinetune


@register
class LTSFT(SparseFromFinetune):
    name = "lt-sft"
    reset_values = True
