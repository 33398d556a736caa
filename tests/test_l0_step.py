"""The fused L0-phase node (`core/l0_step.py`) against the composite formula, eager and compiled kernels."""
import pytest
import torch

from diffprune.core import hard_concrete as hc
from diffprune.core.diff_vector import FlatLayout, L0Diff

SHAPES = [(6, 4), (5,), (3, 4), (7,)]  # tensor 2 (3 rows of 4) plays the word embedding


def make_diff(structured, dtype):
    torch.manual_seed(0)
    diff = L0Diff(FlatLayout([f"t{i}" for i in range(len(SHAPES))], SHAPES), structured=structured).to(dtype)
    with torch.no_grad():
        diff.w.normal_()
        diff.log_alpha.normal_(0.0, 2.0)  # gates spread over 0, (0, 1) and 1
        if structured:
            diff.group_log_alpha.normal_(2.0, 1.0)  # mostly open, so some w gradient flows
    return diff.train()


def loss_and_grads(diff, fused, skip, rows, weights, unused=()):
    """Σ_i ⟨δ_i, R_i⟩ + ⟨δ_rows, R_rows⟩ + 0.7 E‖δ‖₀, with noise from the same seed either way."""
    for p in diff.parameters():
        p.grad = None
    torch.manual_seed(1)
    if fused:
        parts, rows_delta = diff.step_pieces(skip, rows)
    else:
        parts = diff.pieces(skip)
        rows_delta = diff.rows_delta(rows) if rows is not None else None
    loss = 0.7 * (diff.expected_l0() if fused else hc.expected_l0_reference(
        diff.log_alpha, group_log_alpha=diff.group_log_alpha,
        group_sizes=diff.group_sizes if diff.structured else None))
    for i, part in enumerate(parts):
        if part is not None and i not in unused:
            loss = loss + (part * weights[i]).sum()
    if rows is not None:
        loss = loss + (rows_delta * weights[-1][: len(rows)]).sum()
    loss.backward()
    grads = [diff.w.grad, diff.log_alpha.grad] + ([diff.group_log_alpha.grad] if diff.structured else [])
    return loss.detach(), [p for p in parts if p is not None], grads


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("skip", [None, 2])
def test_fused_step_equals_composite_formula(compiled, structured, skip, monkeypatch):
    monkeypatch.setattr(hc.kernels, "enabled", compiled)
    dtype = torch.float64
    diff = make_diff(structured, dtype)
    weights = [torch.randn(s, dtype=dtype) for s in SHAPES] + [torch.randn(3, 4, dtype=dtype)]
    rows = torch.tensor([0, 2]) if skip is not None else None
    ref = loss_and_grads(diff, False, skip, rows, weights, unused=(3,))
    got = loss_and_grads(diff, True, skip, rows, weights, unused=(3,))
    assert torch.allclose(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        assert torch.allclose(a, b)
    for a, b in zip(got[2], ref[2]):
        assert torch.allclose(a, b, atol=1e-10)
    # tensor 3 is unused: w gets no gradient there, α only the penalty's
    w_grad = got[2][0][diff.layout.offsets[3]:]
    assert torch.count_nonzero(w_grad) == 0
    if skip is not None:  # the embedding row that no token uses gets no w gradient either
        row1 = diff.layout.offsets[2] + 4
        assert torch.count_nonzero(got[2][0][row1:row1 + 4]) == 0
    assert torch.count_nonzero(got[2][0]) > 0 and torch.count_nonzero(got[2][1]) > 0


def test_penalty_is_served_once_then_recomputed():
    diff = make_diff(False, torch.float32)
    diff.step_pieces()
    first = diff.expected_l0()
    assert first.grad_fn is not None and "L0Step" in type(first.grad_fn).__name__
    second = diff.expected_l0()  # no new forward pass: computed standalone, same value
    assert "L0Step" not in type(second.grad_fn).__name__
    assert torch.allclose(first, second)
    with pytest.raises(RuntimeError, match="training-mode"):
        diff.eval().step_pieces()


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernels = hc._Kernels()
    kernels.enabled = True
    a = torch.randn(50)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*eager"):
        value = kernels._l0_forward(a, 0.0)
    assert torch.allclose(value, torch.sigmoid(a).sum())
    assert kernels.enabled is False
    assert torch.allclose(kernels._l0_forward(a, 0.0), value)  # eager from now on, no second warning


@pytest.mark.parametrize("structured", [False, True])
def test_in_place_final_delta_equals_composite_gates(structured):
    diff = make_diff(structured, torch.float32)
    got = diff.final_delta(torch.Generator().manual_seed(5))
    expected = diff.gates(stochastic=True, generator=torch.Generator().manual_seed(5)) * diff.w
    assert torch.equal(got, expected)
    assert 0 < torch.count_nonzero(got) < got.numel()


def test_kept_gradient_buffers_hold_the_same_gradients_and_are_reused():
    """grads_in_place: backward writes .grad into buffers kept across steps; values as autograd's."""
    weights = [torch.randn(s) for s in SHAPES] + [torch.randn(3, 4)]
    rows = torch.tensor([0, 2])
    ref = loss_and_grads(make_diff(True, torch.float32), True, 2, rows, weights)[2]
    diff = make_diff(True, torch.float32)
    diff.grads_in_place = True
    first = loss_and_grads(diff, True, 2, rows, weights)[2]
    kept = diff.kept_grads.grads
    assert kept is not None and first[0] is kept[0] and first[1] is kept[1]
    for a, b in zip(first, ref):
        assert torch.equal(a, b)
    second = loss_and_grads(diff, True, 2, rows, weights)[2]  # .grad set to None in between, as zero_grad does
    assert second[0] is kept[0] and torch.equal(second[1], ref[1])


def test_kept_buffers_step_aside_wherever_autograd_must_accumulate():
    weights = [torch.randn(s) for s in SHAPES]
    diff = make_diff(False, torch.float32)
    diff.grads_in_place = True

    def loss():
        torch.manual_seed(1)
        parts, _ = diff.step_pieces()
        return sum((p * wt).sum() for p, wt in zip(parts, weights)) + 0.5 * diff.expected_l0()

    loss().backward()
    once = [diff.w.grad.clone(), diff.log_alpha.grad.clone()]
    loss().backward()  # gradient accumulation: .grad is taken, autograd adds into it
    assert torch.allclose(diff.w.grad, 2 * once[0]) and torch.allclose(diff.log_alpha.grad, 2 * once[1])
    diff.w.grad = diff.log_alpha.grad = None
    grads = torch.autograd.grad(loss(), [diff.w, diff.log_alpha])  # returned, not written to .grad
    assert torch.allclose(grads[0], once[0]) and torch.allclose(grads[1], once[1])
    assert diff.w.grad is None and diff.log_alpha.grad is None
    other = torch.zeros((), requires_grad=True)
    (loss() + other).backward(inputs=[other])  # w and α not asked for: left alone
    assert diff.w.grad is None and diff.log_alpha.grad is None
    diff.grads_in_place = False
    assert diff.kept_grads.grads is None


@pytest.mark.parametrize("compiled", [False, True])
def test_pieces_with_bases_are_theta_plus_delta(compiled, monkeypatch):
    """With θ given, each piece is θ + δ from the same pass, and the gradients are unchanged."""
    monkeypatch.setattr(hc.kernels, "enabled", compiled)
    weights = [torch.randn(s, dtype=torch.float64) for s in SHAPES] + [torch.randn(3, 4, dtype=torch.float64)]
    bases = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    rows = torch.tensor([1])
    diff = make_diff(True, torch.float64)
    ref = loss_and_grads(diff, False, 2, rows, weights)
    for p in diff.parameters():
        p.grad = None
    torch.manual_seed(1)
    parts, rows_delta = diff.step_pieces(2, rows, bases=bases)
    loss = 0.7 * diff.expected_l0() + (rows_delta * weights[-1][:1]).sum()
    for i, part in enumerate(parts):
        if part is not None:
            assert torch.allclose(part - bases[i], ref[1][i if i < 2 else i - 1])
            loss = loss + ((part - bases[i]) * weights[i]).sum()
    loss.backward()
    assert parts[2] is None
    for got, want in zip([diff.w.grad, diff.log_alpha.grad, diff.group_log_alpha.grad], ref[2]):
        assert torch.allclose(got, want, atol=1e-10)
