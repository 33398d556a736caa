"""θ + δ over a frozen Hugging Face model, without forking or patching transformers.

`DeltaModel` keeps the pretrained model untouched (its parameters frozen, the task head trainable) and,
at every forward pass, builds the effective parameters θ + δ from a diff source (`L0Diff` or
`FixedMaskDiff`) and runs the model with them through `torch.func.functional_call`. This works for any
architecture (encoders and decoders alike), samples the gates exactly once per forward pass, and keeps
tied weights tied (`tie_weights=True`), so a tied tensor is diff-pruned, counted and stored once.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .core.diff_vector import FixedMaskDiff, FlatLayout, L0Diff
from .errors import DiffpruneError


def select_parameters(model: nn.Module, head_names: Iterable[str], include: Sequence[str] = (),
                      exclude: Sequence[str] = ()) -> list[str]:
    """Names of the pretrained parameters to diff-prune.

    Default: every parameter that is not part of the task head. `include` / `exclude` are shell-style
    patterns on parameter names (`*.bias`, `*LayerNorm*`); exclusion wins.
    """
    head = set(head_names)
    names = []
    for name, _ in model.named_parameters():  # deduplicated: a tied tensor appears once
        if name in head:
            continue
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        names.append(name)
    if not names:
        raise DiffpruneError(f"no parameter matches include={list(include)} exclude={list(exclude)}; "
                             "nothing to diff-prune")
    return names


def layout_for(model: nn.Module, names: Sequence[str]) -> FlatLayout:
    return FlatLayout(names, [model.get_parameter(n).shape for n in names])


class DeltaModel(nn.Module):
    """Runs `base` with θ + δ for the parameters in `source.layout`; the head trains densely."""

    # Trainer checks this after loading a checkpoint, which (by design) omits the frozen base weights.
    _keys_to_ignore_on_save = None

    def __init__(self, base: nn.Module, source: L0Diff | FixedMaskDiff, head_names: Iterable[str]):
        super().__init__()
        self.base = base
        self.source = source
        self.head_names = list(head_names)
        for name, p in base.named_parameters():
            p.requires_grad_(name in self.head_names)

    @property
    def config(self):  # Trainer and users look for model.config
        return self.base.config

    def effective_parameters(self) -> dict[str, Tensor]:
        """{name: θ + δ} for every diff-pruned tensor whose δ is not structurally zero."""
        layout = self.source.layout
        if isinstance(self.source, L0Diff):
            delta = self.source()  # (d,)
            return {name: self.base.get_parameter(name) + part
                    for name, part in zip(layout.names, layout.split(delta))}
        params = {}
        for i, local, values in self.source.per_tensor():
            name = layout.names[i]
            theta = self.base.get_parameter(name)
            params[name] = theta.reshape(-1).index_add(0, local, values.to(theta.dtype)).view(theta.shape)
        return params

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return functional_call(self.base, self.effective_parameters(), args=(), kwargs=inputs,
                               tie_weights=True, strict=False)

    @torch.no_grad()
    def merged_delta(self) -> Tensor:
        """The current δ as a flat vector (deterministic gate for `L0Diff`)."""
        if isinstance(self.source, L0Diff):
            was = self.source.training
            self.source.eval()
            try:
                return self.source().detach().clone()
            finally:
                self.source.train(was)
        return self.source.dense()
