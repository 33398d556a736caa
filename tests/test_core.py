"""The Diff Pruning maths: gate, expected L0, projection, diff vectors (torch only, no transformers)."""
import math

import pytest
import torch

from diffprune.core import hard_concrete as hc
from diffprune.core.diff_vector import FixedMaskDiff, FlatLayout, L0Diff
from diffprune.core.projection import num_to_keep, project_l0, topk_indices


def test_gate_matches_formula_for_fixed_noise():
    log_alpha = torch.tensor([-3.0, 0.0, 0.7, 5.0])
    u = torch.tensor([0.2, 0.5, 0.9, 0.01])
    z = hc.gate_from_noise(log_alpha, u)
    for a, uu, zz in zip(log_alpha.tolist(), u.tolist(), z.tolist()):
        s = 1 / (1 + math.exp(-(math.log(uu) - math.log(1 - uu) + a)))
        expected = min(1.0, max(0.0, s * 3.0 - 1.5))
        assert zz == pytest.approx(expected, abs=1e-6)


def test_prob_nonzero_matches_monte_carlo():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-2.0, 0.0, 1.5])
    samples = hc.sample_gate(log_alpha.expand(200_000, 3))
    empirical = (samples > 0).float().mean(0)
    closed = torch.sigmoid(log_alpha - math.log(1.5 / 1.5))
    assert torch.allclose(empirical, closed, atol=5e-3)
    # P(z > 0) = P(ŝ > 0) = P(s > 1/2) = sigmoid(α) for the symmetric stretch l = −r
    assert torch.allclose(hc.prob_nonzero(log_alpha), torch.sigmoid(log_alpha))
    # and with an asymmetric stretch the shift is log(−l/r)
    assert hc.prob_nonzero(torch.tensor(0.0), -0.1, 1.1).item() == pytest.approx(1 / (1 + 0.1 / 1.1))


def test_gate_gradcheck():
    torch.manual_seed(0)
    log_alpha = torch.randn(12, dtype=torch.double, requires_grad=True)
    # keep the noise away from the clamp's kinks so finite differences are valid
    u = torch.linspace(0.05, 0.95, 12, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda a: hc.gate_from_noise(a, u, -1.5, 1.5), (log_alpha,))
    assert torch.autograd.gradcheck(lambda a: hc.expected_l0(a), (log_alpha,))


def test_structured_expected_l0_gradcheck_and_value():
    a = torch.randn(7, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, dtype=torch.double, requires_grad=True)
    sizes = torch.tensor([3, 4])
    fn = lambda a, g: hc.expected_l0(a, group_log_alpha=g, group_sizes=sizes)
    assert torch.autograd.gradcheck(fn, (a, g))
    p, pg = torch.sigmoid(a), torch.sigmoid(g)
    expected = p[:3].sum() * pg[0] + p[3:].sum() * pg[1]
    assert fn(a, g).item() == pytest.approx(expected.item())


def test_l0diff_gradcheck_through_delta():
    layout = FlatLayout(["a", "b"], [(2, 3), (4,)])
    torch.manual_seed(0)
    diff = L0Diff(layout, structured=True, alpha_init=0.3, checkpoint_gate=False).double()
    with torch.no_grad():
        diff.w.normal_()
        diff.log_alpha.normal_()
    u = torch.linspace(0.1, 0.9, 10, dtype=torch.double)
    ug = torch.tensor([0.3, 0.6], dtype=torch.double)

    def delta(w, la, gla):
        z = hc.gate_from_noise(la, u) * torch.repeat_interleave(hc.gate_from_noise(gla, ug), diff.group_sizes)
        return z * w

    assert torch.autograd.gradcheck(delta, (diff.w, diff.log_alpha, diff.group_log_alpha))


def test_checkpointed_gate_gives_same_gradients():
    layout = FlatLayout(["a"], [(50,)])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        diff = L0Diff(layout, alpha_init=0.5, checkpoint_gate=ckpt)
        with torch.no_grad():
            diff.w.normal_()
        torch.manual_seed(1)
        (diff() ** 2).sum().backward()
        grads.append((diff.w.grad.clone(), diff.log_alpha.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_initial_gates_are_open_and_eval_is_deterministic():
    diff = L0Diff(FlatLayout(["a"], [(1000,)]), alpha_init=5.0)
    with torch.no_grad():
        diff.w.fill_(1.0)
    diff.eval()
    assert torch.equal(diff(), diff())
    assert diff().min().item() == 1.0  # sigmoid(5)·3 − 1.5 > 1 → clamped to 1
    diff.train()
    assert (diff.final_delta() > 0.5).float().mean() > 0.95


def test_topk_exact_count_with_ties_and_zeros():
    scores = torch.tensor([0.0, 3.0, 0.0, 1.0, 1.0, 0.0, 2.0])
    assert topk_indices(scores, 2).tolist() == [1, 6]
    assert topk_indices(scores, 4).tolist() == [1, 3, 4, 6]
    # fewer nonzeros than k: zeros are added deterministically (lowest index first) ...
    assert topk_indices(scores, 6).tolist() == [0, 1, 2, 3, 4, 6]
    # ... or by the secondary score
    tb = torch.tensor([0.1, 0, 0.2, 0, 0, 0.9, 0])
    assert topk_indices(scores, 5, tiebreak=tb).tolist() == [1, 3, 4, 5, 6]
    # a tie straddling the boundary
    assert topk_indices(scores, 3, tiebreak=torch.tensor([0, 0, 0, 0.0, 0.5, 0, 0])).tolist() == [1, 4, 6]


def test_project_l0_keeps_largest_magnitudes_exactly():
    torch.manual_seed(0)
    delta = torch.randn(10_000)
    idx, vals = project_l0(delta, 0.005)
    assert idx.numel() == 50 == num_to_keep(10_000, 0.005)
    assert torch.equal(vals, delta[idx])
    threshold = delta.abs().sort(descending=True).values[49]
    assert set(idx.tolist()) == set(torch.nonzero(delta.abs() >= threshold).squeeze(1).tolist())


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match="sparsity"):
        num_to_keep(100, bad)


def test_fixed_mask_segments_and_dense():
    layout = FlatLayout(["a", "b", "c"], [(2, 2), (3,), (2,)])
    idx = torch.tensor([1, 3, 7, 8])
    fm = FixedMaskDiff(layout, idx, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    parts = [(i, local.tolist(), v.tolist()) for i, local, v in fm.per_tensor()]
    assert parts == [(0, [1, 3], [1.0, 2.0]), (2, [0, 1], [3.0, 4.0])]
    assert fm.dense().tolist() == [0, 1, 0, 2, 0, 0, 0, 3, 4]
    with pytest.raises(ValueError):
        FixedMaskDiff(layout, torch.tensor([3, 1]))
