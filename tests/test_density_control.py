"""The target-driven L0 phase: the density schedule, the λ controller, and that together they reach t."""
import math

import pytest
import torch

from diffprune.core import hard_concrete as hc
from diffprune.core.density_control import DensitySchedule, GateShift
from diffprune.core.diff_vector import FlatLayout, L0Diff


def test_schedule_holds_then_falls_cubically_then_stays_at_the_target():
    s = DensitySchedule(0.01, hold=0.2, reach=0.6)
    assert s(0.0) == 1.0 and s(0.19) == 1.0 and s(0.2) == 1.0
    # halfway through the ramp: t + (1 - t)(1/2)^3
    assert s(0.4) == pytest.approx(0.01 + 0.99 * 0.125)
    assert s(0.6) == pytest.approx(0.01) and s(1.0) == pytest.approx(0.01)
    values = [s(p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert s.ramp_share() == pytest.approx(0.4)
    with pytest.raises(ValueError):
        DensitySchedule(0.0)
    with pytest.raises(ValueError):
        DensitySchedule(0.01, hold=0.5, reach=0.5)


def test_lr_scale_is_geometric_in_the_density_from_1_to_its_end_value():
    s = DensitySchedule(0.01, hold=0.2, reach=0.6)
    assert s.lr_scale(0.1, 10.0) == 1.0  # density 1: the plain learning rate
    assert s.lr_scale(0.6, 10.0) == pytest.approx(10.0) and s.lr_scale(0.9, 10.0) == pytest.approx(10.0)
    # density 0.1 = t^(1/2) gives end^(1/2); find the progress where ρ_s = 0.1 from the cubic by hand
    x = 1 - ((0.1 - 0.01) / 0.99) ** (1 / 3)
    assert s.lr_scale(0.2 + 0.4 * x, 10.0) == pytest.approx(10.0 ** 0.5)
    assert DensitySchedule(1.0).lr_scale(0.9, 10.0) == 1.0


def test_gate_shift_is_proportional_in_logit_space_and_bounded():
    schedule = DensitySchedule(0.1, hold=0.5, reach=1.0)
    shift = GateShift(schedule, max_step=0.3, gain=0.5)
    assert shift(0.2, 0.01) == 0.0  # held: the gates do not move
    goal = schedule(0.75)
    logit = lambda p: math.log(p / (1 - p))
    dense = goal * 1.2
    assert shift(0.75, dense) == pytest.approx(0.5 * (logit(dense) - logit(goal)))  # above: lower α
    sparse = goal * 0.9
    assert shift(0.75, sparse) == pytest.approx(0.5 * (logit(sparse) - logit(goal)))  # below: raise α
    assert shift(0.75, sparse) < 0
    assert shift(0.75, 0.999) == 0.3 and shift(0.75, 1e-6) == -0.3  # bounded either way
    assert shift(0.75, float("nan")) == 0.0
    with pytest.raises(ValueError):
        GateShift(schedule, max_step=0.0)


def test_shifting_equal_gates_moves_their_density_to_the_schedule():
    """Gates with equal α: one shift of logit(ρ̂) − logit(ρ_s) (gain 1) puts their density on the goal,
    since the density of equal gates is sigmoid(α − log(−l/r))."""
    source = L0Diff(FlatLayout(["a", "b"], [(30,), (20,)]), alpha_init=3.0)
    shift = GateShift(DensitySchedule(0.2, hold=0.0, reach=1.0), max_step=100.0, gain=1.0)
    source.shift_gates_(shift(0.5, source.density()))
    assert source.density() == pytest.approx(DensitySchedule(0.2, 0.0, 1.0)(0.5), rel=1e-5)
    structured = L0Diff(FlatLayout(["a", "b"], [(30,), (20,)]), structured=True, alpha_init=3.0)
    structured.shift_gates_(1.0)
    assert torch.equal(structured.log_alpha.detach(), torch.full((50,), 2.0))
    assert torch.equal(structured.group_log_alpha.detach(), torch.full((2,), 2.0))


def test_steered_gates_reach_the_target_and_keep_the_entries_that_matter():
    """A sparse regression: 40 of 2,000 entries of θ* are nonzero. Trained with the density schedule to
    t = 2%, the gates end within 2× of t, and the entries they keep are the true support."""
    torch.manual_seed(0)
    d, k, steps = 2000, 40, 400
    support = torch.randperm(d)[:k]
    target = torch.zeros(d)
    target[support] = torch.randn(k).sign() * (0.5 + torch.rand(k))
    x = torch.randn(4096, d) / math.sqrt(k)
    y = x @ target

    source = L0Diff(FlatLayout(["theta"], [(d,)]))
    schedule = DensitySchedule(k / d, hold=0.25, reach=0.75)
    shift = GateShift(schedule, max_step=2.0 * (5.0 + 5.0) / (0.5 * steps))
    opt = torch.optim.Adam([{"params": [source.w], "lr": 0.02}, {"params": [source.log_alpha], "lr": 0.1}])
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        progress = step / steps
        rows = torch.randint(0, x.shape[0], (64,), generator=generator)
        delta = source()
        loss = ((x[rows] @ delta - y[rows]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if progress < schedule.hold:
            source.log_alpha.grad = None  # the trainer holds α the same way (learning rate 0)
        opt.step()
        source.shift_gates_(shift(progress, source.density()))
    density = float(hc.prob_nonzero(source.log_alpha.detach()).mean())
    assert k / d / 2 <= density <= 2 * k / d
    kept = torch.topk(hc.prob_nonzero(source.log_alpha.detach()), k).indices
    overlap = len(set(kept.tolist()) & set(support.tolist()))
    assert overlap >= 0.9 * k


def test_density_of_a_group_larger_than_float32_counts_is_exact():
    """A 12M-entry group (a large word embedding): the structured E‖δ‖₀ matches a float64 sum. A float32
    running sum stops adding ~1 per entry near 2^24 (it read 0.9932 here instead of 0.9867)."""
    n = 12_000_000
    source = L0Diff(FlatLayout(["emb", "bias"], [(n,), (100,)]), structured=True)
    p = torch.sigmoid(torch.tensor(5.0, dtype=torch.float64))
    assert source.density() == pytest.approx(float(p * p), rel=1e-5)


def _top_by_sort(values, keep):
    """Independent reference: the first `keep` of a stable sort by decreasing value."""
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


@pytest.mark.parametrize("keep", [0, 1, 7, 40, 63, 100, 137, 200])
def test_top_magnitude_mask_keeps_exactly_the_largest_ties_by_index(keep):
    from diffprune.core.density_control import top_magnitude_mask
    g = torch.Generator().manual_seed(keep)
    values = torch.rand(200, generator=g) * 3
    values[50:150] = 0.0  # a block of zeros, like the unused embedding rows' w
    values[10:13] = values[20]  # and ties above it
    mask = top_magnitude_mask(values, keep)
    assert mask.dtype == torch.bool and int(mask.sum()) == keep
    assert torch.equal(mask, _top_by_sort(values, keep))


def test_top_magnitude_mask_radix_matches_kthvalue_on_spread_values():
    from diffprune.core.density_control import top_magnitude_mask
    values = torch.randn(5000, generator=torch.Generator().manual_seed(1)).abs() * torch.logspace(-8, 3, 5000)
    for keep in (1, 25, 2500, 4999):
        mask = top_magnitude_mask(values, keep)
        cut = values.kthvalue(values.numel() - keep + 1).values
        assert int(mask.sum()) == keep and bool(values[mask].min() == cut) and bool(values[~mask].max() < cut)
    for bad in (torch.tensor([1.0, -0.5]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ValueError):
            top_magnitude_mask(bad, 1)
    with pytest.raises(ValueError):
        top_magnitude_mask(values, 5001)


@pytest.mark.parametrize("structured", [False, True])
def test_hard_gates_sample_exactly_the_mask(structured):
    source = L0Diff(FlatLayout(["a", "b", "c"], [(30,), (20,), (10,)]), structured=structured)
    mask = torch.zeros(60, dtype=torch.bool)
    mask[[0, 5, 29, 31]] = True  # nothing open in "c"
    source.set_gates_(mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(source.gates(True, g), mask.float())
    assert torch.equal(source.gates(False), mask.float())
    assert source.density() == pytest.approx(4 / 60)
    if structured:
        assert source.group_log_alpha.tolist() == [20.0, 20.0, -20.0]
