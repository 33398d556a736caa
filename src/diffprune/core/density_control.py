"""Steering the L0 phase to a chosen density: a target schedule, and two ways for the gates to follow it.

The paper fixes λ and lets the gates settle wherever λ, the budget and the optimizer take them; the
projection to the requested sparsity then removes whatever the gates left over. Here the user gives the
sparsity t and the L0 phase aims at it (the constrained-density idea of Wang et al. 2020 and CoFi,
Xia et al. 2022), so that the projection at its end removes nothing; what follows the schedule is either
the learned gates, shifted (`GateShift`), or the magnitudes of w (`top_magnitude_mask`):

* `DensitySchedule`: the expected share of nonzeros ρ_s the phase should have at each point. It stays at 1
  while the gates are held (w learns with every gate open; with w = 0 the gates get no task gradient and
  any penalty closes them at random), falls from 1 to t on the cubic schedule of gradual pruning (Zhu &
  Gupta 2017: fast while most entries are idle, slow near t, where each one matters), and stays at t for
  the rest of the phase, so that w re-fits the surviving entries before the projection.
* `GateShift`: after every optimizer step, every gate's α is shifted by the same amount, down while the
  measured density ρ̂ = E‖δ‖₀/d is above the schedule and up while below: the penalty applied decoupled
  from the optimizer, as AdamW decouples weight decay. α's own optimizer sees only the task gradient, so
  a gate stays open where the task keeps pushing its α up faster than the shift lowers it.
* `top_magnitude_mask`: the other way to follow the schedule (`gate_choice="magnitude"`): after every
  step of the ramp, exactly round(ρ_s·d) entries are open, those of largest |w|, and the rest closed:
  gradual magnitude pruning (Zhu & Gupta 2017) of the diff, inside the L0 phase. No gate noise and no gate
  gradient; an entry closed at one step may reopen at a later one if its w (still moved by Adam's
  momentum) overtakes a kept entry's.

Why not a penalty weight steered through the loss (a Lagrange multiplier): α trains with Adam, which
normalises each α's step, so the penalty's size barely changes how fast idle gates close. What λ does
change it changes late and all at once: the density only responds once the common α has left the flat top
of the sigmoid, a multiplier winds up meanwhile, and Adam's second-moment estimate lags a growing
gradient, so its steps then exceed its learning rate (on MiniLM a multiplicative λ controller overshot the
target by an order of magnitude within a few steps; benchmarks/RESULTS.md, session 7). The shift here acts in logit space, where the density of a set of
equal gates moves one for one with their α, and is bounded per step, so nothing winds up or coasts.

Plain torch; `diffprune.methods.diff_pruning` wires both into its L0 phase.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class DensitySchedule:
    """ρ_s(progress), progress = share of the L0 phase's steps done, in [0, 1].

    1 on [0, hold), then T + (1 − T)(1 − x)³ with x the share of the ramp [hold, reach) done, then T.
    """

    def __init__(self, target: float, hold: float = 0.25, reach: float = 0.75):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"the target density must be in (0, 1], got {target}")
        if not 0.0 <= hold < reach <= 1.0:
            raise ValueError(f"the schedule needs 0 <= hold < reach <= 1, got hold={hold}, reach={reach}")
        self.target, self.hold, self.reach = float(target), float(hold), float(reach)

    def __call__(self, progress: float) -> float:
        if progress < self.hold:
            return 1.0
        x = min(1.0, (progress - self.hold) / (self.reach - self.hold))
        return self.target + (1.0 - self.target) * (1.0 - x) ** 3

    def lr_scale(self, progress: float, end: float) -> float:
        """A learning-rate multiplier that follows the density: 1 at ρ_s = 1, `end` at ρ_s = t, and
        end^(log ρ_s / log t) in between (geometric in the density: the share of the dense update each
        surviving entry has to carry grows as the others close)."""
        if self.target >= 1.0:
            return 1.0
        return float(end) ** (math.log(self(progress)) / math.log(self.target))

    def ramp_share(self) -> float:
        """Share of the phase over which the density falls (what the α learning rate must cover)."""
        return self.reach - self.hold


class GateShift:
    """The per-step shift of every gate's α that steers ρ̂ = E‖δ‖₀/d to a `DensitySchedule`.

    shift = clip(gain · (logit ρ̂ − logit ρ_s), −max_step, max_step): proportional control in logit space.
    The gates integrate the shift, so no integral term (and no state beyond α itself) is needed: a resumed
    run continues exactly from the checkpointed α. `max_step` bounds how fast gates move for the penalty
    (in α units per step); the method sizes it to the budget.
    """

    def __init__(self, schedule: DensitySchedule, max_step: float, gain: float = 0.5):
        if max_step <= 0 or not 0 < gain <= 1:
            raise ValueError(f"the shift needs max_step > 0 and gain in (0, 1], got {max_step}, {gain}")
        self.schedule, self.max_step, self.gain = schedule, float(max_step), float(gain)

    def __call__(self, progress: float, density: float) -> float:
        """How much to lower every α after the step at `progress` that left the density at `density`."""
        if progress < self.schedule.hold or not math.isfinite(density):
            return 0.0
        error = _logit(density) - _logit(self.schedule(progress))
        return min(self.max_step, max(-self.max_step, self.gain * error))


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p / (1.0 - p))


def top_magnitude_mask(magnitudes: Tensor, keep: int) -> Tensor:
    """A bool mask with exactly `keep` True entries: those of the largest magnitudes (≥ 0), ties broken by index.

    This runs after every step on all d entries, where a kthvalue over MiniLM's 22.7M costs about as much
    as the step itself. So the cut is found by radix selection instead: a non-negative float32's bits,
    read as an int32, sort like the float, so two bincounts (over the top 16 bits, then the low 16 bits of
    the one bucket that holds the cut) give the keep-th largest value exactly. Ties matter: the
    word-embedding rows no batch used keep w = 0, and while `keep` exceeds the entries with w ≠ 0 the cut
    falls inside that block of zeros.
    """
    d = magnitudes.numel()
    if not 0 <= keep <= d:
        raise ValueError(f"keep must be in [0, {d}], got {keep}")
    if keep == d:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    values = magnitudes.detach().float().contiguous()
    if not float(values.min()) >= 0.0:  # also catches NaN
        raise ValueError("top_magnitude_mask takes magnitudes: values >= 0, no NaN")
    cut, above, equal = _kth_largest(values, keep)
    if above + equal == keep:  # no tie to break (the usual case once the cut is above w's zeros)
        return values >= cut
    mask = values > cut
    ties = torch.nonzero(values == cut).squeeze(1)[:keep - above]  # the rest, first by index
    mask[ties] = True
    return mask


def _kth_largest(values: Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest of non-negative float32 `values` (1 <= k <= numel), by 2 × 16-bit radix selection,
    with how many values lie above it and how many equal it."""
    bits = values.view(torch.int32).flatten()
    high = bits >> 16
    bucket, above, _ = _bucket_of_kth(torch.bincount(high, minlength=1 << 15), k)
    low = bits[high == bucket] & 0xFFFF
    rest, above_in, equal = _bucket_of_kth(torch.bincount(low, minlength=1 << 16), k - above)
    cut = float(torch.tensor((bucket << 16) | rest, dtype=torch.int32).view(torch.float32))
    return cut, above + above_in, equal


def _bucket_of_kth(counts: Tensor, k: int) -> tuple[int, int, int]:
    """The bucket holding the k-th largest item, how many items lie in the buckets above it, and its count."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bucket = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < counts.numel() else 0
    return bucket, above, int(counts[bucket])
