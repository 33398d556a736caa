"""The diff vector δ over a set of frozen tensors, in its two training forms.

Every diff-pruned tensor of the model is laid end to end in one flat vector of length d (`FlatLayout`),
so gate sampling, the L0 penalty, the optimizer step and the global top-k projection are each one
vectorised operation over d instead of a loop over a hundred tensors.

* `L0Diff` — the L0 phase: δ = z ⊙ w with Hard-Concrete gates z (optionally times one group gate per
  tensor: structured Diff Pruning), w initialised at 0 and α at α₀ (z ≈ 1 at the start).
* `FixedMaskDiff` — the fixed-mask phase and every other sparse method (non-adaptive Diff Pruning,
  LT-SFT): a fixed sorted set of flat positions and one trainable value per position.

Plain torch, no transformers: the model wrapper that turns δ into θ + δ lives in `diffprune.sparse_model`.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from . import hard_concrete as hc
from .l0_step import KeptGrads, L0Step, StepPlan

HARD_GATE = 20.0  # |α| of a gate made hard (`L0Diff.set_gates_`): its samples are exactly 0 or 1


class FlatLayout:
    """Offsets of named tensors inside one flat vector."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes) or not names:
            raise ValueError("a layout needs one shape per name and at least one tensor")
        self.names = list(names)
        self.shapes = [tuple(int(s) for s in shape) for shape in shapes]
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.names)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of `flat` shaped like each tensor (no copy).

        `torch.split` matters here: its backward concatenates the pieces' gradients once, whereas one
        slice per tensor would make autograd build a zero tensor of the full length d for every piece
        (seen: 2.9 s of 6.9 s per MiniLM step spent filling zeros).
        """
        return [part.view(shape) for part, shape in zip(torch.split(flat, self.numels), self.shapes)]

    def segments(self, flat_indices: Tensor) -> list[tuple[int, int]]:
        """For sorted flat indices, the [start, stop) range of them that falls into each tensor."""
        bounds = torch.searchsorted(flat_indices, torch.tensor(self.offsets, dtype=flat_indices.dtype))
        bounds = bounds.tolist()
        return list(zip(bounds, bounds[1:]))


class L0Diff(nn.Module):
    """δ = z ⊙ w with stretched Hard-Concrete gates, trained with the expected-L0 penalty.

    Training-mode gates are fresh samples (`hard_concrete.sampled_product`, which keeps one d-sized
    tensor for backward); eval-mode gates are the noise-free expected gate. `pieces(skip)` and
    `rows_delta(rows)` let the model wrapper build the δ of one large tensor (the word embedding) only for
    the rows a batch uses: the other rows cannot change this step's loss, so gating them is wasted work.
    """

    def __init__(self, layout: FlatLayout, structured: bool = False, alpha_init: float = 5.0,
                 left: float = hc.LEFT, right: float = hc.RIGHT):
        super().__init__()
        hc.log_ratio(left, right)  # validates the interval
        self.layout, self.left, self.right = layout, left, right
        self.structured = structured
        d = layout.total
        self.w = nn.Parameter(torch.zeros(d))
        self.log_alpha = nn.Parameter(torch.full((d,), float(alpha_init)))
        if structured:
            self.group_log_alpha = nn.Parameter(torch.full((len(layout),), float(alpha_init)))
        else:
            self.register_parameter("group_log_alpha", None)
        self.register_buffer("group_sizes", torch.tensor(layout.numels, dtype=torch.long), persistent=False)
        self._skipped: tuple | None = None  # (w rows, α rows, group gate) of the tensor left to rows_delta
        self._step_l0: Tensor | None = None  # E‖δ‖₀ from the last `step_pieces`, for `expected_l0`
        self.kept_grads = KeptGrads()  # w's and α's gradient buffers, when grads_in_place

    @property
    def grads_in_place(self) -> bool:
        """Whether `step_pieces`' backward may write w's and α's gradients into kept buffers (`KeptGrads`
        says when it does): saves a MiniLM step ~12% of its time in page faults. Off by default; the
        trainer's L0 phase turns it on. Gradients are the same either way."""
        return self.kept_grads.enabled

    @grads_in_place.setter
    def grads_in_place(self, on: bool) -> None:
        self.kept_grads.enabled = bool(on)
        if not on:  # give the buffers back (2·d floats)
            self.kept_grads.grads = self.kept_grads.accumulators = None

    def _expand(self, per_group: Tensor) -> Tensor:
        return torch.repeat_interleave(per_group, self.group_sizes, output_size=self.layout.total)

    def _gated(self, w: Tensor, log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z ⊙ w elementwise: sampled in training mode, the expected gate in eval mode."""
        if self.training:
            return hc.sampled_product(w, log_alpha, self.left, self.right, generator)
        return hc.expected_gate(log_alpha, self.left, self.right) * w

    def _group_gates(self, generator: torch.Generator | None = None) -> Tensor:
        if self.training:
            return hc.sample_gate(self.group_log_alpha, self.left, self.right, generator)
        return hc.expected_gate(self.group_log_alpha, self.left, self.right)

    def gates(self, stochastic: bool, generator: torch.Generator | None = None) -> Tensor:
        """z over all d entries (times the group gate when structured), without gradients' concerns."""
        if stochastic:
            z = hc.sample_gate(self.log_alpha, self.left, self.right, generator)
        else:
            z = hc.expected_gate(self.log_alpha, self.left, self.right)
        if self.structured:
            if stochastic:
                zg = hc.sample_gate(self.group_log_alpha, self.left, self.right, generator)
            else:
                zg = hc.expected_gate(self.group_log_alpha, self.left, self.right)
            z = z * self._expand(zg)
        return z

    def forward(self) -> Tensor:
        """δ (flat, length d): a fresh sample in training mode, the noise-free gate in eval mode."""
        delta = self._gated(self.w, self.log_alpha)
        if self.structured:
            delta = delta * self._expand(self._group_gates())
        return delta

    def pieces(self, skip: int | None = None) -> list[Tensor | None]:
        """δ per tensor, shaped like it (one gate sample for all); tensor number `skip` is None.

        The skipped tensor's w and α rows are kept for `rows_delta` in the same forward pass (its first
        dimension is the row dimension). w and α are split once, so backward concatenates their gradients
        once instead of filling a d-sized zero tensor per piece.
        """
        layout = self.layout
        zg = self._group_gates() if self.structured else None
        if skip is None:
            bounds = [(0, len(layout))]
        else:
            bounds = [(0, skip), (skip, skip + 1), (skip + 1, len(layout))]
        sizes = [layout.offsets[b] - layout.offsets[a] for a, b in bounds]
        out: list[Tensor | None] = []
        for (a, b), w, log_alpha in zip(bounds, torch.split(self.w, sizes), torch.split(self.log_alpha, sizes)):
            if b == a:
                continue
            if a == skip:
                rows = layout.shapes[skip][0]
                self._skipped = (w.view(rows, -1), log_alpha.view(rows, -1), None if zg is None else zg[skip])
                out.append(None)
                continue
            delta = self._gated(w, log_alpha)
            parts = torch.split(delta, layout.numels[a:b])
            for i, part in zip(range(a, b), parts):
                part = part.view(layout.shapes[i])
                out.append(part * zg[i] if zg is not None else part)
        return out

    def step_pieces(self, skip: int | None = None, rows: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    bases: Sequence[Tensor] | None = None) -> tuple[list[Tensor | None], Tensor]:
        """Training-mode δ per tensor (tensor `skip` is None) and δ of its `rows`, from one `L0Step` node.

        The same values as `pieces` + `rows_delta` in training mode, but the backward writes the flat
        gradients of w and α in one pass, the penalty's included: E‖δ‖₀ of this pass is kept and the next
        `expected_l0()` returns it (once), so the penalty joins the same node. With `bases` (θ per tensor
        of the layout) each piece is θ + δ, added in the gate's own pass.
        """
        if not self.training:
            raise RuntimeError("step_pieces is the training-mode path; use pieces() in eval mode")
        layout = self.layout
        bounds = [(0, len(layout))] if skip is None else [(0, skip), (skip + 1, len(layout))]
        plan = StepPlan(layout.numels, layout.shapes, layout.offsets, [(a, b) for a, b in bounds if b > a],
                        skip, rows if skip is not None else None, self.left, self.right, self.kept_grads,
                        list(bases) if bases is not None else None)
        self.kept_grads.watch(self.w, self.log_alpha)
        group_z = group_p = None
        if self.structured:
            group_z = hc.sample_gate(self.group_log_alpha, self.left, self.right, generator)
            group_p = hc.prob_nonzero(self.group_log_alpha, self.left, self.right)
        *pieces, rows_delta, l0 = L0Step.apply(self.w, self.log_alpha, group_z, group_p, plan, generator)
        self._step_l0 = l0
        out: list[Tensor | None] = list(pieces)
        if skip is not None:
            out.insert(skip, None)
        return out, rows_delta

    def rows_delta(self, rows: Tensor) -> Tensor:
        """δ of the given rows of the tensor skipped by the last `pieces` call: (len(rows), row size)."""
        if self._skipped is None:
            raise RuntimeError("rows_delta needs a preceding pieces(skip=...) in the same forward pass")
        w, log_alpha, zg = self._skipped
        delta = self._gated(w.index_select(0, rows), log_alpha.index_select(0, rows))
        return delta * zg if zg is not None else delta

    def expected_l0(self) -> Tensor:
        """E‖δ‖₀ (a differentiable scalar); after `step_pieces`, the value that pass computed (once)."""
        cached, self._step_l0 = self._step_l0, None
        if cached is not None and self.training and torch.is_grad_enabled():
            return cached
        return hc.expected_l0(self.log_alpha, self.left, self.right, self.group_log_alpha,
                              self.layout.numels if self.structured else None)

    @torch.no_grad()
    def keep_probability(self) -> Tensor:
        """P(δ_i ≠ 0) per entry: the tie-break when projecting."""
        p = hc.prob_nonzero(self.log_alpha, self.left, self.right)
        if self.structured:
            p = p * self._expand(hc.prob_nonzero(self.group_log_alpha, self.left, self.right))
        return p

    @torch.no_grad()
    def density(self) -> float:
        """E‖δ‖₀ / d now (no graph)."""
        return float(hc.expected_l0(self.log_alpha, self.left, self.right, self.group_log_alpha,
                                    self.layout.numels if self.structured else None)) / self.layout.total

    @torch.no_grad()
    def shift_gates_(self, amount: float) -> None:
        """Lower every α (element and group gates) by `amount`: the decoupled penalty step of `GateShift`."""
        if amount:
            self.log_alpha.sub_(amount)
            if self.structured:
                self.group_log_alpha.sub_(amount)

    @torch.no_grad()
    def set_gates_(self, open_mask: Tensor, level: float = HARD_GATE) -> None:
        """Make the gates hard: α = +level where `open_mask`, −level elsewhere (at ±20 every Hard-Concrete
        sample is exactly 1 or 0, since |logit u| ≤ 14 for u in [EPS, 1 − EPS], whenever the stretch
        interval reaches 0.3% of its width past 0 and 1, as the default (−1.5, 1.5) does). Structured: a group gate
        is open iff its tensor holds an open entry, so the group gates close only what holds nothing."""
        self.log_alpha.copy_(torch.where(open_mask, level, -level))
        if self.structured:
            groups = torch.stack([part.any() for part in torch.split(open_mask, self.layout.numels)])
            self.group_log_alpha.copy_(torch.where(groups, level, -level))

    @torch.no_grad()
    def open_fraction(self) -> float:
        """Share of entries whose gate is more likely open than closed (P(z > 0) > 0.5)."""
        return float((self.keep_probability() > 0.5).float().mean())

    @torch.no_grad()
    def final_delta(self, generator: torch.Generator | None = None) -> Tensor:
        """δ = z ⊙ w with u sampled once: the paper's end-of-phase diff (many entries exactly 0).

        Built in place in one d-sized buffer (the same values as `gates(True) * w` for the same generator
        state): this runs while w, α and their optimizer states are all alive, so temporaries set the peak.
        """
        delta = hc.sample_gate_(self.log_alpha, self.left, self.right, generator)
        if self.structured:
            group = hc.sample_gate(self.group_log_alpha, self.left, self.right, generator)
            for part, zg in zip(torch.split(delta, self.layout.numels), group):
                part.mul_(zg)
        return delta.mul_(self.w)


class FixedMaskDiff(nn.Module):
    """A diff with a fixed support: sorted flat positions and one trainable value each."""

    def __init__(self, layout: FlatLayout, indices: Tensor, values: Tensor | None = None):
        super().__init__()
        indices = indices.to(torch.long).reshape(-1)
        if indices.numel() and (indices[0] < 0 or indices[-1] >= layout.total):
            raise ValueError("mask positions fall outside the diff vector")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("mask positions must be strictly increasing")
        self.layout = layout
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel()) if values is None else values.detach().clone().float())
        # Per tensor: the [start, stop) slice of (indices, values) that falls into it.
        self._segments = layout.segments(indices)

    def per_tensor(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(tensor number, local flat positions, values) for every tensor with at least one position."""
        for i, (a, b) in enumerate(self._segments):
            if b > a:
                yield i, self.indices[a:b] - self.layout.offsets[i], self.values[a:b]

    def dense(self) -> Tensor:
        """δ as a dense flat vector (for tests and small models)."""
        return torch.zeros(self.layout.total, dtype=self.values.dtype).index_put((self.indices,), self.values)
