"""The stretched Hard-Concrete gate and its expected L0 norm (Louizos et al. 2018; Guo et al. 2021).

Diff Pruning writes the task diff as δ = z ⊙ w, where each z is a gate that is exactly 0 or 1 with
positive probability and differentiable in between:

    u ~ U(0, 1);  s = sigmoid(log u − log(1 − u) + α);  ŝ = s (r − l) + l;  z = min(1, max(0, ŝ))

with l = −1.5, r = 1.5 and no temperature, as in the paper and its code. The probability that a gate is
nonzero has the closed form P(z > 0) = sigmoid(α − log(−l / r)), so the expected L0 norm of δ is a sum of
sigmoids and the whole objective is differentiable by the reparameterisation trick. Everything here is
plain torch: autograd computes every gradient (checked with `torch.autograd.gradcheck` in the tests).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LEFT = -1.5
RIGHT = 1.5
# u is drawn from [EPS, 1 − EPS] so that logit(u) stays finite in float32.
EPS = 1e-6


def log_ratio(left: float = LEFT, right: float = RIGHT) -> float:
    """c = log(−l / r): the shift in P(z > 0) = sigmoid(α − c)."""
    if not (left < 0.0 < right):
        raise ValueError(f"the stretch interval must satisfy l < 0 < r, got l={left}, r={right}")
    return math.log(-left / right)


def sample_uniform(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [EPS, 1 − EPS] shaped like `like`."""
    u = torch.rand(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    return u.clamp_(EPS, 1.0 - EPS)


def gate_from_noise(log_alpha: Tensor, u: Tensor, left: float = LEFT, right: float = RIGHT) -> Tensor:
    """z = clamp(sigmoid(logit(u) + α) (r − l) + l, 0, 1): the reparameterised sample for noise u."""
    s = torch.sigmoid(torch.logit(u) + log_alpha)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def sample_gate(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                generator: torch.Generator | None = None) -> Tensor:
    """A fresh stochastic gate sample (used at every training step and once for the final mask)."""
    return gate_from_noise(log_alpha, sample_uniform(log_alpha, generator), left, right)


class _SampledProduct(torch.autograd.Function):
    """z ⊙ w for a fresh gate sample z(α, u), computed in place and differentiated by hand.

    The autograd graph of the composite formula keeps four d-sized intermediates and replays eight
    elementwise passes; here the forward builds z in one buffer and keeps only z, from which the backward
    gets everything: on 0 < z < 1, s = (z − l)/(r − l), so ∂z/∂α = (r − l) s (1 − s) = (z − l)(r − z)/(r − l),
    and ∂z/∂α = 0 where the clamp is active. Checked against the composite formula in the tests.
    """

    @staticmethod
    def forward(ctx, w, log_alpha, left, right, generator):
        z = torch.rand(log_alpha.shape, dtype=log_alpha.dtype, device=log_alpha.device, generator=generator)
        z.clamp_(EPS, 1.0 - EPS).logit_().add_(log_alpha).sigmoid_()
        z.mul_(right - left).add_(left).clamp_(0.0, 1.0)
        ctx.save_for_backward(w, z)
        ctx.interval = (left, right)
        return z * w

    @staticmethod
    def backward(ctx, grad):
        w, z = ctx.saved_tensors
        left, right = ctx.interval
        grad_w = grad * z if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (z - left).mul_(right - z).div_(right - left).mul_(grad).mul_(w)
            grad_alpha.masked_fill_((z <= 0.0).logical_or_(z >= 1.0), 0.0)
        return grad_w, grad_alpha, None, None, None


def sampled_product(w: Tensor, log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                    generator: torch.Generator | None = None) -> Tensor:
    """z ⊙ w with z = `sample_gate(log_alpha, …)` (same noise for the same generator state), but fused:
    the training-step form of the gate, with the memory of one saved d-sized tensor."""
    return _SampledProduct.apply(w, log_alpha, left, right, generator)


def expected_gate(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT) -> Tensor:
    """The noise-free gate clamp(sigmoid(α)(r − l) + l, 0, 1): a deterministic estimate for evaluation."""
    return (torch.sigmoid(log_alpha) * (right - left) + left).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT) -> Tensor:
    """P(z > 0) = sigmoid(α − log(−l / r)), elementwise; its sum is the expected L0 norm."""
    return torch.sigmoid(log_alpha - log_ratio(left, right))


class _ExpectedL0(torch.autograd.Function):
    """Σ_g P(z^g > 0) Σ_{i∈g} sigmoid(α_i − c) that keeps nothing d-sized for backward.

    Autograd would keep sigmoid(α − c) (one float per diff-pruned entry) from the forward pass to the
    backward pass, at the point where activations peak; here backward recomputes it from α, which is a
    parameter and alive anyway: ∂/∂α_i = P(z^{g(i)} > 0) · s_i (1 − s_i), built in place in the returned
    gradient. `sizes` (a list) is None for unstructured gates.
    """

    @staticmethod
    def forward(ctx, log_alpha, shift, sizes, group_log_alpha):
        p = torch.sigmoid(log_alpha.detach() - shift)
        if sizes is None:
            per_group = p.sum().reshape(1)
        else:  # one reduction, not one op per group (each op pays a thread hand-off)
            per_group = torch.segment_reduce(p, "sum", lengths=torch.tensor(sizes, device=p.device))
        del p
        group_p = torch.sigmoid(group_log_alpha.detach() - shift) if group_log_alpha is not None else None
        ctx.save_for_backward(log_alpha, per_group, group_p)
        ctx.shift, ctx.sizes = shift, sizes
        return (per_group * group_p).sum() if group_p is not None else per_group.sum()

    @staticmethod
    def backward(ctx, grad):
        log_alpha, per_group, group_p = ctx.saved_tensors
        s = torch.sub(log_alpha.detach(), ctx.shift).sigmoid_()
        s.addcmul_(s, s, value=-1.0)  # s − s² = s (1 − s)
        if group_p is None:
            s.mul_(grad)
            return s, None, None, None
        lengths = torch.tensor(ctx.sizes, device=s.device)
        s.mul_(torch.repeat_interleave(grad * group_p, lengths, output_size=s.numel()))
        grad_group = grad * per_group * group_p * (1.0 - group_p) if ctx.needs_input_grad[3] else None
        return s, None, None, grad_group


def expected_l0(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                group_log_alpha: Tensor | None = None, group_sizes=None) -> Tensor:
    """E‖δ‖₀ for unstructured gates, or Σ_g Σ_{i∈g} P(z_i > 0) P(z^g > 0) with structured group gates.

    `group_sizes[g]` (a list or tensor) is the number of consecutive entries of `log_alpha` in group g.
    Same value and gradients as `expected_l0_reference` (tested), without its d-sized saved tensor.
    """
    sizes = None
    if group_log_alpha is not None:
        if group_sizes is None:
            raise ValueError("structured expected L0 needs group_sizes")
        sizes = group_sizes.tolist() if isinstance(group_sizes, Tensor) else [int(n) for n in group_sizes]
    return _ExpectedL0.apply(log_alpha, log_ratio(left, right), sizes, group_log_alpha)


def expected_l0_reference(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                          group_log_alpha: Tensor | None = None, group_sizes: Tensor | None = None) -> Tensor:
    """The same penalty written with plain autograd ops (the tests check `expected_l0` against it)."""
    p = prob_nonzero(log_alpha, left, right)
    if group_log_alpha is None:
        return p.sum()
    per_group = torch.segment_reduce(p, "sum", lengths=torch.as_tensor(group_sizes))  # (G,)
    return (per_group * prob_nonzero(group_log_alpha, left, right)).sum()
