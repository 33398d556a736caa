"""One autograd node for a whole L0-phase forward pass: every gated tensor, the used embedding rows, E‖δ‖₀.

Built with ordinary autograd, a training step of the L0 phase makes the flat gradients of w and α out of
pieces: the per-tensor gradients are concatenated (a d-sized copy for w, another for α), the embedding
rows are scattered into a zero-filled tensor, and the penalty's gradient is added to α's (another
d-sized pass and temporary). On a CPU those copies and fresh allocations cost as much as the gate itself.
`L0Step` instead takes w, α (and the group gates) whole and, in backward, writes each tensor's gradient
straight into its slice of two flat buffers with one fused kernel (`hard_concrete._gate_backward_into`),
penalty included. Its forward makes each tensor's θ + δ and its share of E‖δ‖₀ in one pass
(`hard_concrete._gate_apply_`), and the two flat buffers can be kept from step to step (`KeptGrads`).
The values are those of the composite formula (tested against it).

Plain torch; `L0Diff.step_pieces` is the only caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import hard_concrete as hc


class KeptGrads:
    """w's and α's gradient buffers, kept by an `L0Diff` from one training step to the next.

    On a CPU every fresh tensor of tens of MB comes straight from mmap and is paid again in page faults
    on its first write. Measured on a MiniLM step: the fused backward took 55 ms writing into fresh
    gradients against 15 ms into kept ones, the penalty's gradient over the word embedding 42 against 4;
    the whole L0 step went from ~1.20x to ~1.06x the time of a full-finetuning step, for ~0.02x more
    peak memory (the kept buffers are alive during the forward pass too).

    Only while `enabled` (the trainer's L0 phase turns it on), backward writes the two gradients into
    the kept buffers and sets them as `.grad` itself, instead of handing fresh tensors to autograd. And
    only where autograd would do exactly that: a plain `.backward()` that reaches both parameters, `.grad`
    empty, no hooks on them, no create_graph, no process group (DDP and its kin wait on autograd's own
    accumulation). Anywhere else the gradients go back to autograd as usual, so the values are the same
    either way; only the memory they live in differs. The next step overwrites a buffer, as it would any
    `.grad` after `zero_grad(set_to_none=False)`.
    """

    def __init__(self):
        self.enabled = False
        self.grads: tuple[Tensor, Tensor] | None = None
        self.accumulators: tuple | None = None  # autograd's AccumulateGrad nodes of (w, α)

    def watch(self, w: Tensor, log_alpha: Tensor) -> None:
        """Keep the parameters' AccumulateGrad nodes (needs grad mode) for `grad_targets`."""
        if self.enabled and self.accumulators is None and torch.is_grad_enabled() and w.is_leaf:
            self.accumulators = tuple(p.view_as(p).grad_fn.next_functions[0][0] for p in (w, log_alpha))

    def grad_targets(self, w: Tensor, log_alpha: Tensor) -> tuple[Tensor, Tensor] | None:
        """The kept gradient buffers if this backward may write `.grad` itself (see the class), else None."""
        if not self.enabled or self.accumulators is None or torch.is_grad_enabled():
            return None
        for p in (w, log_alpha):
            if (not p.is_leaf or p.grad is not None or getattr(p, "_backward_hooks", None)
                    or getattr(p, "_post_accumulate_grad_hooks", None)):
                return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return None
        try:  # False under .backward(inputs=[…]) without them; raises under torch.autograd.grad
            if not all(torch._C._will_engine_execute_node(node) for node in self.accumulators):
                return None
        except Exception:  # noqa: BLE001 - any doubt: let autograd accumulate
            return None
        if self.grads is None or self.grads[0].shape != w.shape or self.grads[0].device != w.device:
            self.grads = (torch.empty_like(w), torch.empty_like(log_alpha))
        return self.grads


@dataclass
class StepPlan:
    """What one forward pass gates: tensors [a, b) of the layout in `ranges`, the rows `rows` of tensor
    `skip` (None: no row gating), with the gate interval (left, right)."""
    numels: list[int]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    ranges: list[tuple[int, int]]
    skip: int | None
    rows: Tensor | None
    left: float
    right: float
    kept: KeptGrads  # the owner's gradient buffers
    bases: list[Tensor] | None = None  # θ per tensor: the outputs are then θ + δ rather than δ


class L0Step(torch.autograd.Function):
    """Outputs: one δ (θ + δ when the plan has `bases`) per gated tensor (in layout order, the skipped one
    left out), δ of the used rows of the skipped tensor (empty when there is none), and E‖δ‖₀
    (structured: Σ_g P(z^g > 0) Σ_{i∈g} P(z_i > 0)).

    `group_z` (sampled group gates) and `group_p` (their P(z^g > 0)) come from autograd outside, so their
    own gradients (into the group α) stay ordinary autograd on G numbers.
    """

    @staticmethod
    def forward(ctx, w, log_alpha, group_z, group_p, plan: StepPlan, generator):
        ctx.set_materialize_grads(False)
        left, right, offs = plan.left, plan.right, plan.offsets
        pieces, zs, sums = [], [], [None] * len(plan.numels)  # sums: Σ P(z > 0) per tensor
        one = torch.ones((), dtype=w.dtype, device=w.device)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        for a, b in plan.ranges:
            start, stop = offs[a], offs[b]
            z = hc.uniform(stop - start, w.dtype, w.device, generator)
            zs.append(z)  # noise now, each tensor's gate once its kernel has run
            for i in range(a, b):
                lo, hi = offs[i], offs[i + 1]
                theta = plan.bases[i].reshape(-1) if plan.bases is not None else zero
                out, sums[i] = hc.kernels._gate_apply_(z[lo - start:hi - start], log_alpha[lo:hi], w[lo:hi],
                                                       theta, group_z[i] if group_z is not None else one,
                                                       left, right)
                pieces.append(out.view(plan.shapes[i]))
        rows_delta, z_rows = w.new_zeros(0), None
        if plan.skip is not None and plan.rows is not None:
            w_rows, a_rows = _rows_of(plan, w, plan.rows), _rows_of(plan, log_alpha, plan.rows)
            u = hc.uniform(w_rows.shape, w.dtype, w.device, generator)
            z_rows, rows_delta = hc.kernels._gate_forward(u, a_rows, w_rows, left, right)
            if group_z is not None:
                rows_delta = rows_delta * group_z[plan.skip]
        shift = hc.log_ratio(left, right)
        if plan.skip is not None:
            sums[plan.skip] = hc.kernels._l0_forward(log_alpha[offs[plan.skip]:offs[plan.skip + 1]], shift)
        per_group = torch.stack(sums)
        l0 = (per_group * group_p).sum() if group_p is not None else per_group.sum()
        ctx.save_for_backward(w, log_alpha, group_z, group_p)
        ctx.zs, ctx.z_rows, ctx.per_group, ctx.plan, ctx.shift = zs, z_rows, per_group, plan, shift
        return (*pieces, rows_delta, l0)

    @staticmethod
    def backward(ctx, *grads):
        w, log_alpha, group_z, group_p = ctx.saved_tensors
        plan, shift, offs = ctx.plan, ctx.shift, ctx.plan.offsets
        *piece_grads, grad_rows, grad_l0 = grads
        one = torch.ones((), dtype=w.dtype, device=w.device)
        grad_l0 = grad_l0 if grad_l0 is not None else torch.zeros_like(one)
        targets = plan.kept.grad_targets(w, log_alpha)
        grad_w, grad_alpha = targets if targets is not None else (torch.empty_like(w), torch.empty_like(log_alpha))
        grad_group_z = torch.zeros_like(group_z) if group_z is not None else None

        def scales(i):  # (group gate of tensor i, the penalty's weight on its entries)
            if group_z is None:
                return one, grad_l0
            return group_z[i].detach(), grad_l0 * group_p[i].detach()

        k = 0
        for (a, b), z in zip(plan.ranges, ctx.zs):
            local = 0
            for i in range(a, b):
                start, stop, n = offs[i], offs[i + 1], plan.numels[i]
                scale, penalty = scales(i)
                g = piece_grads[k]
                k += 1
                if g is None:
                    grad_w[start:stop].zero_()
                    hc.kernels._penalty_grad_into(grad_alpha[start:stop], log_alpha[start:stop], penalty, shift)
                else:
                    red = hc.kernels._gate_backward_into(grad_w[start:stop], grad_alpha[start:stop],
                                                         g.reshape(-1), w[start:stop], z[local:local + n],
                                                         log_alpha[start:stop], scale, penalty, shift,
                                                         plan.left, plan.right)
                    if grad_group_z is not None:
                        grad_group_z[i] = red
                local += n
        if plan.skip is not None:
            i = plan.skip
            start, stop = offs[i], offs[i + 1]
            scale, penalty = scales(i)
            grad_w[start:stop].zero_()
            hc.kernels._penalty_grad_into(grad_alpha[start:stop], log_alpha[start:stop], penalty, shift)
            if grad_rows is not None and ctx.z_rows is not None:
                rows, z = plan.rows, ctx.z_rows
                w_rows, a_rows = _rows_of(plan, w, rows), _rows_of(plan, log_alpha, rows)
                gw, ga = hc.kernels._gate_backward(grad_rows.contiguous(), w_rows, z, plan.left, plan.right)
                _rows_of(plan, grad_w, None).index_copy_(0, rows, gw * scale)
                _rows_of(plan, grad_alpha, None).index_add_(0, rows, ga * scale)
                if grad_group_z is not None:
                    grad_group_z[i] = (grad_rows * z * w_rows).sum()
        grad_group_p = grad_l0 * ctx.per_group if group_p is not None else None
        if targets is not None:  # written where autograd would have put them (KeptGrads)
            w.grad, log_alpha.grad = grad_w, grad_alpha
            grad_w = grad_alpha = None
        return grad_w, grad_alpha, grad_group_z, grad_group_p, None, None


def _rows_of(plan: StepPlan, flat: Tensor, rows: Tensor | None) -> Tensor:
    """The skipped tensor's slice of `flat` as (rows, row size); `rows` selects some of them (a copy)."""
    i = plan.skip
    view = flat[plan.offsets[i]:plan.offsets[i + 1]].view(plan.shapes[i][0], -1)
    return view if rows is None else view.index_select(0, rows)
