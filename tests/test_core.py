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
    diff = L0Diff(layout, structured=True, alpha_init=0.3).double()
    with torch.no_grad():
        diff.w.normal_()
        diff.log_alpha.normal_()
    u = torch.linspace(0.1, 0.9, 10, dtype=torch.double)
    ug = torch.tensor([0.3, 0.6], dtype=torch.double)

    def delta(w, la, gla):
        z = hc.gate_from_noise(la, u) * torch.repeat_interleave(hc.gate_from_noise(gla, ug), diff.group_sizes)
        return z * w

    assert torch.autograd.gradcheck(delta, (diff.w, diff.log_alpha, diff.group_log_alpha))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_sampled_product_matches_composite_formula(dtype):
    """Same noise (same generator state) → same δ and the same gradients as autograd through the formula."""
    torch.manual_seed(0)
    w0 = torch.randn(5000, dtype=dtype)
    a0 = torch.randn(5000, dtype=dtype) * 2  # spreads z over 0, (0, 1) and 1
    g = torch.randn(5000, dtype=dtype)
    results = []
    for fused in (False, True):
        w, a = w0.clone().requires_grad_(), a0.clone().requires_grad_()
        gen = torch.Generator().manual_seed(7)
        out = hc.sampled_product(w, a, generator=gen) if fused else hc.sample_gate(a, generator=gen) * w
        out.backward(g)
        results.append((out.detach(), w.grad, a.grad))
    z = hc.sample_gate(a0, generator=torch.Generator().manual_seed(7))
    assert 0.05 < (z == 0).double().mean() and 0.05 < (z == 1).double().mean()  # the clamp is exercised
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for ref, got in zip(results[0], results[1]):
        torch.testing.assert_close(got, ref, **tol)


def test_fused_sampled_product_gradcheck():
    torch.manual_seed(1)
    w = torch.randn(40, dtype=torch.double, requires_grad=True)
    a = torch.randn(40, dtype=torch.double, requires_grad=True)
    # the same generator state each call, so the function gradcheck sees is deterministic
    fn = lambda w, a: hc.sampled_product(w, a, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w, a))


def test_l0diff_pieces_equal_flat_delta_and_rows():
    layout = FlatLayout(["emb", "b", "c"], [(6, 4), (5,), (2, 3)])
    for structured in (False, True):
        diff = L0Diff(layout, structured=structured, alpha_init=0.4).eval()
        with torch.no_grad():
            diff.w.normal_()
            diff.log_alpha.normal_()
        flat = diff()
        whole = [p.reshape(-1) for p in diff.pieces()]
        assert torch.allclose(torch.cat(whole), flat)
        skipped = diff.pieces(skip=0)
        assert skipped[0] is None
        assert torch.allclose(torch.cat([p.reshape(-1) for p in skipped[1:]]), flat[24:])
        rows = torch.tensor([1, 4])
        assert torch.allclose(diff.rows_delta(rows), flat[:24].view(6, 4)[rows])


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


@pytest.mark.parametrize("structured", [False, True])
def test_expected_l0_matches_autograd_reference(structured):
    torch.manual_seed(0)
    sizes = [5, 17, 1, 30]
    a = (torch.randn(53, dtype=torch.double) * 3).requires_grad_()
    g = torch.randn(4, dtype=torch.double, requires_grad=True) if structured else None
    args = (g, sizes) if structured else (None, None)
    got = hc.expected_l0(a, -1.5, 1.5, *args)
    ref = hc.expected_l0_reference(a, -1.5, 1.5, *args)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    inputs = (a, g) if structured else (a,)
    torch.testing.assert_close(torch.autograd.grad(3 * got, inputs), torch.autograd.grad(3 * ref, inputs))
    fn = (lambda a, g: hc.expected_l0(a, -1.5, 1.5, g, sizes)) if structured else (lambda a: hc.expected_l0(a))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("with_tiebreak", [False, True])
def test_topk_indices_matches_a_full_sort_with_massive_ties(with_tiebreak):
    """Reference: sort by (score desc, tiebreak desc, index asc) and take k, on vectors that are mostly ties."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 3000
        scores = torch.zeros(n)
        scores[torch.randperm(n, generator=gen)[:40]] = torch.randint(1, 5, (40,), generator=gen).float()
        tiebreak = torch.randint(0, 3, (n,), generator=gen).float() if with_tiebreak else None
        k = int(torch.randint(1, n, (1,), generator=gen))
        keys = sorted(range(n), key=lambda i: (-scores[i].item(), -(tiebreak[i].item() if with_tiebreak else 0), i))
        expected = sorted(keys[:k])
        assert topk_indices(scores, k, tiebreak).tolist() == expected, (trial, k)


def test_first_true_across_chunks():
    from diffprune.core.projection import _first_true

    mask = torch.rand(100, generator=torch.Generator().manual_seed(1)) > 0.6
    for count in (0, 1, 5, int(mask.sum())):
        assert _first_true(mask, count, chunk=7).tolist() == torch.nonzero(mask).squeeze(1)[:count].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_exp_gate_kernel_matches_the_logit_formula_at_the_extremes(dtype):
    """The kernels write sigmoid(logit u + α) as u / (u + (1 − u) e^−α): same gate, finite for any α."""
    log_alpha = torch.tensor([-200.0, -88.0, -20.0, -1.0, 0.0, 1.0, 20.0, 88.0, 200.0], dtype=dtype)
    for u in (hc.EPS, 0.3, 0.5, 0.999, 1.0 - hc.EPS, 0.0, 1.0):  # 0 and 1 are clamped like the formula's
        noise = torch.full_like(log_alpha, u)
        z, zw = hc._gate_forward(noise, log_alpha, torch.full_like(log_alpha, 2.0), hc.LEFT, hc.RIGHT)
        want = hc.gate_from_noise(log_alpha, noise.clamp(hc.EPS, 1 - hc.EPS))
        assert torch.isfinite(z).all() and torch.allclose(z, want, atol=1e-6)
        assert torch.allclose(zw, 2.0 * want, atol=2e-6)
        kept = noise.clone()
        out, p_sum = hc._gate_apply_(kept, log_alpha, torch.full_like(log_alpha, 2.0),
                                     torch.ones_like(log_alpha), torch.tensor(0.5, dtype=dtype), hc.LEFT, hc.RIGHT)
        assert torch.allclose(kept, want, atol=1e-6)  # the gate, written over the noise
        assert torch.allclose(out, 1.0 + want, atol=1e-6)
        assert torch.allclose(p_sum, hc.prob_nonzero(log_alpha).sum())
    # P(z > 0) with an asymmetric interval, where −l / r ≠ 1
    kept = torch.full_like(log_alpha, 0.5)
    _, p_sum = hc._gate_apply_(kept, log_alpha, log_alpha, log_alpha, torch.tensor(1.0, dtype=dtype), -0.1, 1.1)
    assert torch.allclose(p_sum, hc.prob_nonzero(log_alpha, -0.1, 1.1).sum())


def test_chunked_noise_is_uniform_seeded_and_independent_of_the_thread_count(monkeypatch):
    n = 2 * hc.NOISE_CHUNK + 12345
    first = hc.uniform(n, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    monkeypatch.setattr(hc, "_pool", (__import__("os").getpid(), hc.ThreadPoolExecutor(1)))
    again = hc.uniform((n,), torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    other = hc.uniform(n, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(6))
    assert not torch.equal(first, other)
    chunks = first[: 2 * hc.NOISE_CHUNK].view(2, -1)
    assert not torch.equal(chunks[0], chunks[1])  # each chunk has its own stream
    assert 0.0 <= float(first.min()) and float(first.max()) < 1.0
    assert abs(float(first.mean()) - 0.5) < 0.002 and abs(float(first.var()) - 1 / 12) < 0.002
    short = hc.uniform((3, 5), torch.float64, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert torch.equal(short, torch.rand((3, 5), dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
