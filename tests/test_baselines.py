"""Baseline methods (BitFit, last-layer, non-adaptive Diff Pruning, LT-SFT) over tiny transformers:
what trains, that training works, and export → save → load → apply parity."""
import pytest
import torch

from conftest import make_tiny, random_batch, phase_steps
from diffprune.errors import DiffpruneError
from diffprune.methods import get_method, make_config
from diffprune.models import head_names_by_convention
from diffprune.storage import apply_diff, load_diff, save_diff

LABELS = torch.tensor([0, 1, 1])
# the top transformer block of each tiny (2-layer) architecture, spelled out independently of the method
TOP_LAYER = {"bert": "bert.encoder.layer.1.", "roberta": "roberta.encoder.layer.1.",
             "distilbert": "distilbert.transformer.layer.1.", "gpt2": "transformer.h.1."}


def build(name, arch, **options):
    model = make_tiny(arch)
    head = head_names_by_convention(model)
    cls = get_method(name)
    return cls(make_config(cls, options), model, head), model, head


def n_trainable(spec):
    params = [p for g in spec.groups for p in g.params]
    assert len({id(p) for p in params}) == len(params), "a parameter sits in two groups"
    assert all(p.requires_grad for p in params)
    return sum(p.numel() for p in params)


def steps(spec, batch, n=20, lr=1e-2):
    return phase_steps(spec, batch, LABELS, n, lr)


def roundtrip(method, model, arch, tmp_path, batch):
    """Logits of the method's eval model vs. a fresh base model with the saved diff applied."""
    with torch.no_grad():
        expected = method.eval_model().eval()(**batch).logits
    diff = method.export()
    diff.base_model, diff.task, diff.label_names = "tiny", "toy", ["a", "b"]
    save_diff(diff, tmp_path / "d", model)
    fresh = make_tiny(arch)  # same seed → same θ
    apply_diff(fresh, load_diff(tmp_path / "d"))
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, expected, atol=1e-5)
    return diff


# ------------------------------------------------------------------------------------------------ dense ones

def test_bitfit_trains_biases_and_head(arch, tmp_path):
    method, model, head = build("bitfit", arch)
    expected = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and n not in head)
    expected += sum(model.get_parameter(n).numel() for n in head)
    spec = method.build_phase("finetune")
    assert n_trainable(spec) == expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".bias")
              and n not in head}
    batch = random_batch(model)
    losses = steps(spec, batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    diff = roundtrip(method, model, arch, tmp_path, batch)
    assert not diff.sparse and not diff.config.get("fingerprint_dense")
    assert set(diff.dense) == {n for n, _ in model.named_parameters() if n.endswith(".bias")} | set(head)


def test_last_layer_trains_top_block_and_head(arch, tmp_path):
    method, model, head = build("last-layer", arch)
    top = TOP_LAYER[arch]
    expected = sum(p.numel() for n, p in model.named_parameters() if n.startswith(top))
    expected += sum(model.get_parameter(n).numel() for n in head)
    assert expected > sum(model.get_parameter(n).numel() for n in head)
    spec = method.build_phase("finetune")
    assert n_trainable(spec) == expected
    batch = random_batch(model)
    losses = steps(spec, batch)
    assert losses[-1] < losses[0]
    diff = roundtrip(method, model, arch, tmp_path, batch)
    assert set(diff.dense) == {n for n, _ in model.named_parameters() if n.startswith(top)} | set(head)


def test_last_layer_without_layers_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cls = get_method("last-layer")
    with pytest.raises(DiffpruneError, match="no transformer layers"):
        cls(make_config(cls, {}), model, ["1.weight", "1.bias"])


def test_dense_restore_roundtrip():
    method, model, head = build("bitfit", "bert")
    steps(method.build_phase("finetune"), random_batch(model), n=3)
    diff = method.export()
    other, fresh, _ = build("bitfit", "bert")
    other.restore(diff)
    assert all(torch.equal(fresh.get_parameter(n), v) for n, v in diff.dense.items())


# ------------------------------------------------------------------------------------------------ sparse ones

def finetuned(name, arch, sparsity=0.02):
    """A method after its finetune phase (20 steps) and the finetuned θ_ft, before end_phase."""
    method, model, head = build(name, arch, sparsity=sparsity)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = method.build_phase("finetune")
    expected = sum(p.numel() for p in model.parameters())  # everything: body + head
    assert n_trainable(spec) == expected
    batch = random_batch(model)
    losses = steps(spec, batch)
    assert losses[-1] < losses[0]
    ft = {n: p.detach().clone() for n, p in model.named_parameters()}
    return method, model, head, theta, ft, batch


@pytest.mark.parametrize("name", ["non-adaptive-diff-pruning", "lt-sft"])
def test_sparse_baselines_phases_and_roundtrip(name, arch, tmp_path):
    method, model, head, theta, ft, batch = finetuned(name, arch)
    method.end_phase("finetune")
    # every diff-prunable parameter is back at θ, bit for bit; the head keeps its finetuned values
    for n, p in model.named_parameters():
        assert torch.equal(p, ft[n] if n in head else theta[n]), n
    # the kept positions are exactly a top-k of |θ_ft − θ| over the flat layout
    names = method.layout.names
    delta = torch.cat([(ft[n] - theta[n]).reshape(-1) for n in names])
    k = round(0.02 * delta.numel())
    source = method.delta_model.source
    idx = source.indices
    assert idx.numel() == k
    kept = torch.zeros(delta.numel(), dtype=torch.bool)
    kept[idx] = True
    assert delta.abs()[kept].min() >= delta.abs()[~kept].max()
    if name == "lt-sft":
        assert torch.count_nonzero(source.values) == 0
    else:
        assert torch.equal(source.values, delta[idx])

    fm = method.build_phase("fixed_mask")
    assert [g.name for g in fm.groups] == ["diff", "head"]
    assert fm.groups[0].lr == pytest.approx(method.config.lr / 0.02 ** 0.5)  # default: lr / √t
    assert n_trainable(fm) == k + sum(model.get_parameter(n).numel() for n in head)
    losses = steps(fm, batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters() if n not in head)
    diff = roundtrip(method, model, arch, tmp_path, batch)
    assert diff.nnz == k and not diff.config.get("fingerprint_dense")

    other, _, _ = build(name, arch, sparsity=0.02)
    other.restore(load_diff(tmp_path / "d"))
    with torch.no_grad():
        assert torch.allclose(other.eval_model().eval()(**batch).logits,
                              method.eval_model()(**batch).logits, atol=1e-5)


def test_lt_sft_selects_the_same_positions_as_non_adaptive():
    nadp, *_ = finetuned("non-adaptive-diff-pruning", "bert")
    lt, *_ = finetuned("lt-sft", "bert")  # same seed, same batch, same steps → same θ_ft
    nadp.end_phase("finetune")
    lt.end_phase("finetune")
    a, b = nadp.delta_model.source, lt.delta_model.source
    assert torch.equal(a.indices, b.indices)
    assert torch.count_nonzero(b.values) == 0 and torch.count_nonzero(a.values) > 0


def test_sparse_restore_resets_an_in_place_finetuned_model():
    method, model, head, theta, ft, batch = finetuned("non-adaptive-diff-pruning", "bert")
    snapshot = finetuned("non-adaptive-diff-pruning", "bert")[0]
    snapshot.end_phase("finetune")
    method.restore(snapshot.export())  # e.g. --resume right after the finetune phase
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters() if n not in head)
    assert torch.equal(method.delta_model.source.indices, snapshot.delta_model.source.indices)


@pytest.mark.parametrize("name", ["non-adaptive-diff-pruning", "lt-sft"])
def test_sparse_config_validation(name):
    cls = get_method(name)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(DiffpruneError, match=r"sparsity.*\(0, 1\]"):
            make_config(cls, dict(sparsity=bad))
    with pytest.raises(DiffpruneError, match="finetune_epochs"):
        make_config(cls, dict(finetune_epochs=0))
    with pytest.raises(DiffpruneError, match="unknown option"):
        make_config(cls, dict(l0_lambda=1.0))


@pytest.mark.parametrize("name", ["bitfit", "last-layer"])
def test_dense_config_validation(name):
    with pytest.raises(DiffpruneError, match="lr"):
        make_config(get_method(name), dict(lr=0))


def test_unknown_method_still_suggests():
    with pytest.raises(DiffpruneError, match="did you mean 'bitfit'"):
        get_method("bitfti")
    with pytest.raises(DiffpruneError, match="did you mean 'lt-sft'"):
        get_method("lt-sf")
