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
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

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


# CPU draws longer than this are split into chunks of this size, each with its own generator (`uniform`).
NOISE_CHUNK = 1 << 20
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own


def _noise_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max(1, torch.get_num_threads()), "diffprune-noise"))
    return _pool[1]


def uniform(shape, dtype: torch.dtype, device: torch.device,
            generator: torch.Generator | None = None) -> Tensor:
    """U(0, 1) noise: `torch.rand`, but filled in parallel on the CPU.

    PyTorch's CPU generator fills a tensor serially: ~50 ms for the 11M gates of a MiniLM step, 5% of
    the step. A CPU draw of more than NOISE_CHUNK entries is cut into chunks of NOISE_CHUNK, each drawn
    from its own generator seeded from `generator` (or the global one), on a thread pool. The values
    depend on the seed and the size only, not on the number of threads; short draws are `torch.rand`.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    n = flat.numel()
    if out.device.type != "cpu" or n <= NOISE_CHUNK:
        return flat.uniform_(0.0, 1.0, generator=generator).view(out.shape)
    seeds = torch.randint(0, 2 ** 62, ((n + NOISE_CHUNK - 1) // NOISE_CHUNK,), generator=generator).tolist()

    def fill(i: int) -> None:
        chunk = flat[i * NOISE_CHUNK:(i + 1) * NOISE_CHUNK]
        chunk.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(seeds[i]))

    list(_noise_pool().map(fill, range(len(seeds))))
    return out


def sample_uniform(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [EPS, 1 − EPS] shaped like `like`."""
    return uniform(like.shape, like.dtype, like.device, generator).clamp_(EPS, 1.0 - EPS)


def gate_from_noise(log_alpha: Tensor, u: Tensor, left: float = LEFT, right: float = RIGHT) -> Tensor:
    """z = clamp(sigmoid(logit(u) + α) (r − l) + l, 0, 1): the reparameterised sample for noise u."""
    s = torch.sigmoid(torch.logit(u) + log_alpha)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def sample_gate(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                generator: torch.Generator | None = None) -> Tensor:
    """A fresh stochastic gate sample (used at every training step and once for the final mask)."""
    return gate_from_noise(log_alpha, sample_uniform(log_alpha, generator), left, right)


def _gate_of(u: Tensor, neg_exp_alpha: Tensor, left: float, right: float) -> Tensor:
    """z for noise u given e^−α: sigmoid(logit u + α) = u / (u + (1 − u) e^−α), one transcendental (e^−α)
    instead of three, and finite for any α. The kernels below inline it when compiled."""
    u = u.clamp(EPS, 1.0 - EPS)
    s = u / (u + (1.0 - u) * neg_exp_alpha)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def _gate_forward(u: Tensor, log_alpha: Tensor, w: Tensor, left: float, right: float) -> tuple[Tensor, Tensor]:
    """(z, z ⊙ w) for uniform noise u: the elementwise body of `sampled_product`, one pass when compiled."""
    z = _gate_of(u, torch.exp(-log_alpha), left, right)
    return z, z * w


def _gate_apply_(u: Tensor, log_alpha: Tensor, w: Tensor, theta: Tensor, scale: Tensor, left: float,
                 right: float) -> tuple[Tensor, Tensor]:
    """(θ + (z ⊙ w) · scale, Σ P(z > 0)) for uniform noise u, with the gate z written over u in place.

    The training forward of one tensor and its share of the L0 penalty in one pass when compiled: no z,
    δ or scaled-δ temporaries (each a fresh allocation, on a CPU paid again in page faults: 25 ms of a
    MiniLM step) and no second read of α for the penalty. sigmoid(logit u + α) = u / (u + (1 − u) e^−α)
    and P(z > 0) = sigmoid(α − c) = 1 / (1 + (−l / r) e^−α) share one exponential.
    """
    e = torch.exp(-log_alpha)
    z = _gate_of(u, e, left, right)
    u.copy_(z)
    return theta + (z * w) * scale, (1.0 / (1.0 + (-left / right) * e)).sum()


def _gate_slope(z: Tensor, left: float, right: float) -> Tensor:
    """∂z/∂α from the sampled z alone: on 0 < z < 1, s = (z − l)/(r − l), so ∂z/∂α = (r − l) s (1 − s)
    = (z − l)(r − z)/(r − l); where the clamp is active ∂z/∂α = 0."""
    inside = (z > 0.0) & (z < 1.0)
    return torch.where(inside, (z - left) * (right - z) / (right - left), torch.zeros_like(z))


def _gate_backward(grad: Tensor, w: Tensor, z: Tensor, left: float, right: float) -> tuple[Tensor, Tensor]:
    """(∂/∂w, ∂/∂α) of z ⊙ w from the saved z alone."""
    return grad * z, grad * w * _gate_slope(z, left, right)


def _gate_backward_into(out_w: Tensor, out_alpha: Tensor, grad: Tensor, w: Tensor, z: Tensor,
                        log_alpha: Tensor, scale: Tensor, penalty: Tensor, shift: float, left: float,
                        right: float) -> Tensor:
    """The whole L0-phase gradient of one tensor, written into slices of the flat gradients.

    For δ = scale · z ⊙ w (scale: the tensor's group gate, or 1) and a penalty term `penalty` · Σ P(z_i > 0):
    ∂/∂w = scale · g · z; ∂/∂α = scale · g · w · ∂z/∂α + penalty · s(1 − s) with s = sigmoid(α − c).
    Returns Σ g · z · w, the gradient of the group gate. Written in place so that no d-sized temporary
    (and no concatenation of per-tensor gradients) exists.
    """
    g = grad * scale
    out_w.copy_(g * z)
    out_alpha.copy_(g * w * _gate_slope(z, left, right) + _l0_backward(log_alpha, shift, penalty))
    return (grad * z * w).sum()


def _penalty_grad_into(out_alpha: Tensor, log_alpha: Tensor, penalty: Tensor, shift: float) -> None:
    """∂/∂α of penalty · Σ P(z_i > 0) alone, written into `out_alpha`."""
    out_alpha.copy_(_l0_backward(log_alpha, shift, penalty))


def _l0_forward(log_alpha: Tensor, shift: float) -> Tensor:
    return torch.sigmoid(log_alpha - shift).sum()


def _l0_backward(log_alpha: Tensor, shift: float, grad: Tensor) -> Tensor:
    """grad · s(1 − s) with s = sigmoid(α − c): the derivative of grad · Σ P(z_i > 0)."""
    s = torch.sigmoid(log_alpha - shift)
    return grad * s * (1.0 - s)


class _Kernels:
    """The elementwise bodies above, run through `torch.compile` when it works, eagerly otherwise.

    Eagerly each body is five to ten passes over d-sized tensors (and as many temporaries); inductor
    fuses each into one loop, which is what brings the L0 phase near the cost of full finetuning (see
    benchmarks/speed.py). Compilation happens once per process on first use (a few seconds; cached on
    disk by inductor). If it fails (no C++ compiler, an unsupported platform) the eager bodies are used
    and a warning says so. DIFFPRUNE_COMPILE=0 forces eager. Noise is always drawn eagerly, so the same
    generator state gives the same gates either way.
    """

    names = ("_gate_forward", "_gate_apply_", "_gate_backward", "_gate_backward_into", "_penalty_grad_into",
             "_l0_forward", "_l0_backward")  # _gate_slope and _gate_of are inlined into these

    def __init__(self):
        flag = os.environ.get("DIFFPRUNE_COMPILE", "1").strip().lower()
        self.enabled = flag not in ("0", "false", "no", "off")
        self._compiled: dict[str, object] = {}

    def __getattr__(self, name: str):
        if name not in _Kernels.names:
            raise AttributeError(name)
        eager = globals()[name]
        if not self.enabled:
            return eager
        if name in self._compiled:
            return self._compiled[name]
        compiled = torch.compile(eager, dynamic=True)

        def run(*args):
            if not self.enabled:
                return eager(*args)
            try:
                return compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                self.enabled = False
                warnings.warn(f"torch.compile of the Diff Pruning gate failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); using eager kernels "
                              "(correct, slower). Set DIFFPRUNE_COMPILE=0 to skip the attempt.", stacklevel=2)
                return eager(*args)
        self._compiled[name] = run
        return run


kernels = _Kernels()


@torch.no_grad()
def sample_gate_(log_alpha: Tensor, left: float = LEFT, right: float = RIGHT,
                 generator: torch.Generator | None = None) -> Tensor:
    """`sample_gate` without autograd, built in one buffer: the end-of-phase mask over all d entries
    without the four d-sized temporaries of the composite formula (same noise, same values)."""
    z = sample_uniform(log_alpha, generator)
    return z.logit_().add_(log_alpha).sigmoid_().mul_(right - left).add_(left).clamp_(0.0, 1.0)


class _SampledProduct(torch.autograd.Function):
    """z ⊙ w for a fresh gate sample z(α, u), differentiated by hand.

    The autograd graph of the composite formula keeps four d-sized intermediates and replays eight
    elementwise passes; here the forward keeps only z, from which the backward gets everything
    (`_gate_backward`). Checked against the composite formula in the tests.
    """

    @staticmethod
    def forward(ctx, w, log_alpha, left, right, generator):
        u = uniform(log_alpha.shape, log_alpha.dtype, log_alpha.device, generator)
        z, out = kernels._gate_forward(u, log_alpha, w, left, right)
        ctx.save_for_backward(w, z)
        ctx.interval = (left, right)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, z = ctx.saved_tensors
        grad_w, grad_alpha = kernels._gate_backward(grad.contiguous(), w, z, *ctx.interval)
        return (grad_w if ctx.needs_input_grad[0] else None, grad_alpha if ctx.needs_input_grad[1] else None,
                None, None, None)


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
    parameter and alive anyway: ∂/∂α_i = P(z^{g(i)} > 0) · s_i (1 − s_i) (`_l0_backward`). `sizes` (a list)
    is None for unstructured gates.
    """

    @staticmethod
    def forward(ctx, log_alpha, shift, sizes, group_log_alpha):
        if sizes is None:
            per_group = kernels._l0_forward(log_alpha.detach(), shift).reshape(1)
        else:
            # torch.sum per group, not one segment_reduce: segment_reduce adds a group's entries one by one
            # in float32, which stops counting past ~2^23 of them (MiniLM's word embedding has 11.7M), while
            # torch.sum reduces pairwise
            p = torch.sigmoid(log_alpha.detach() - shift)
            per_group = torch.stack([part.sum() for part in torch.split(p, sizes)])
            del p
        group_p = torch.sigmoid(group_log_alpha.detach() - shift) if group_log_alpha is not None else None
        ctx.save_for_backward(log_alpha, per_group, group_p)
        ctx.shift, ctx.sizes = shift, sizes
        return (per_group * group_p).sum() if group_p is not None else per_group.sum()

    @staticmethod
    def backward(ctx, grad):
        log_alpha, per_group, group_p = ctx.saved_tensors
        if group_p is None:
            return kernels._l0_backward(log_alpha.detach(), ctx.shift, grad), None, None, None
        lengths = torch.tensor(ctx.sizes, device=log_alpha.device)
        scale = torch.repeat_interleave(grad * group_p, lengths, output_size=log_alpha.numel())
        grad_alpha = kernels._l0_backward(log_alpha.detach(), ctx.shift, scale)
        grad_group = grad * per_group * group_p * (1.0 - group_p) if ctx.needs_input_grad[3] else None
        return grad_alpha, None, None, grad_group


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
