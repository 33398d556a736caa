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
from torch.nn import functional as F
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


def row_gated_embedding(model: nn.Module, layout: FlatLayout) -> tuple[int, nn.Embedding] | None:
    """(layout index, module) of the input word embedding if its δ can be built for used rows only.

    That holds when the embedding is a plain `nn.Embedding` in the layout whose weight no other module
    uses (a weight tied to an LM decoder sees every row in every step, so it must be gated whole).
    """
    try:
        module = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(module) is not nn.Embedding or module.max_norm is not None or module.scale_grad_by_freq:
        return None
    weight = module.weight
    users = sum(1 for m in model.modules() for p in m.parameters(recurse=False) if p is weight)
    names = [n for n, p in model.named_parameters() if p is weight]
    if users != 1 or not names or names[0] not in layout.names:
        return None
    return layout.names.index(names[0]), module


class DeltaModel(nn.Module):
    """Runs `base` with θ + δ for the parameters in `source.layout`; the head trains densely.

    In the L0 phase the input word embedding (about half of d for small encoders) is handled by rows:
    the model keeps its frozen weight θ and a forward hook adds δ for just the token ids in the batch
    (`gate_used_rows=True`). The result is the same θ + δ lookup, at a fraction of the gate's cost.
    """

    # Trainer checks this after loading a checkpoint, which (by design) omits the frozen base weights.
    _keys_to_ignore_on_save = None
    SOURCE = "source."  # state-dict prefix of the diff's own tensors (checkpoints keep its buffers)

    def __init__(self, base: nn.Module, source: L0Diff | FixedMaskDiff, head_names: Iterable[str],
                 gate_used_rows: bool = True):
        super().__init__()
        self.base = base
        self.source = source
        self.head_names = list(head_names)
        for name, p in base.named_parameters():
            p.requires_grad_(name in self.head_names)
        self._rows = None
        self._step_rows = None  # (input_ids, rows, inverse, δ rows) of the running training forward
        if isinstance(source, L0Diff) and gate_used_rows:
            self._rows = row_gated_embedding(base, source.layout)

    @property
    def config(self):  # Trainer and users look for model.config
        return self.base.config

    def effective_parameters(self, input_ids: Tensor | None = None) -> dict[str, Tensor]:
        """{name: θ + δ} for every diff-pruned tensor whose δ is not structurally zero (and not row-gated).

        In training mode the L0 diff comes from one fused node (`L0Diff.step_pieces`); the δ of the used
        embedding rows is built there too, from `input_ids`, and kept for the embedding hook.
        """
        layout = self.source.layout
        if isinstance(self.source, L0Diff):
            skip = self._rows[0] if self._rows is not None else None
            if self.source.training:
                rows = None
                if skip is not None and input_ids is not None:
                    rows, inverse = torch.unique(input_ids, return_inverse=True)
                bases = [self.base.get_parameter(name) for name in layout.names]
                pieces, rows_delta = self.source.step_pieces(skip, rows, bases=bases)  # θ + δ already
                self._step_rows = (input_ids, rows, inverse, rows_delta) if rows is not None else None
                return {name: part for name, part in zip(layout.names, pieces) if part is not None}
            pieces = self.source.pieces(skip)
            return {name: self.base.get_parameter(name) + part
                    for name, part in zip(layout.names, pieces) if part is not None}
        params = {}
        for i, local, values in self.source.per_tensor():
            name = layout.names[i]
            theta = self.base.get_parameter(name)
            params[name] = theta.reshape(-1).index_add(0, local, values.to(theta.dtype)).view(theta.shape)
        return params

    def _add_row_delta(self, module: nn.Embedding, args, output: Tensor) -> Tensor:
        """Forward hook: θ[ids] + δ[ids] with δ gated for the distinct ids of this batch only."""
        ids = args[0]
        step = self._step_rows
        same_ids = step is not None and ids.numel() == step[0].numel() and torch.equal(ids.reshape(-1),
                                                                                         step[0].reshape(-1))
        if same_ids:
            _, rows, inverse, delta = step  # built with the rest of δ by the fused training node
            inverse = inverse.reshape(ids.shape)
        else:
            if self.source.training:
                raise RuntimeError("the word embedding was called with other ids than the model's input_ids; "
                                   "diff-prune it whole with gate_used_rows=False")
            rows, inverse = torch.unique(ids, return_inverse=True)
            delta = self.source.rows_delta(rows)
        padding = None  # the padding row gets no gradient, exactly as in nn.Embedding
        if module.padding_idx is not None:
            hit = (rows == module.padding_idx).nonzero()
            padding = int(hit[0, 0]) if hit.numel() else None
        return output + F.embedding(inverse, delta.to(output.dtype), padding_idx=padding)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        inputs = {k: v for k, v in inputs.items() if v is not None}
        self._step_rows = None
        params = self.effective_parameters(input_ids)
        hook = self._rows[1].register_forward_hook(self._add_row_delta) if self._rows is not None else None
        try:
            return functional_call(self.base, params, args=(), kwargs=inputs, tie_weights=True, strict=False)
        finally:
            self._step_rows = None
            if hook is not None:
                hook.remove()

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
