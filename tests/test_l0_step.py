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
