"""Head importance and head pruning (diffprune.heads) on tiny models of every family that allows it.

The central check: a model with head h of layer l removed by weight surgery computes the same logits as
the unpruned model with that head's output multiplied by 0 through the importance mask hooks. Importance
is checked against central finite differences of the loss in float64.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, random_batch

from diffprune.errors import DiffpruneError
from diffprune.heads import (CONFIG_KEY, ZeroHeadAttention, count_parameters, head_importance, head_masks,
                             load_importance, load_pruned, plot_importance, prune_heads, pruned_heads_of,
                             reapply_pruning, save_importance, select_heads_to_prune)

# families with one key/value head per query head (grouped-query attention is tested on its own below)
SUPPORTED = ("bert", "roberta", "distilbert", "gpt2", "deberta-v2", "roformer", "modernbert", "bart")
GQA = ("llama", "qwen2")  # 4 query heads, 2 key/value heads: groups {0, 1} and {2, 3}
LAYERS, HEADS, HIDDEN = 2, 4, 32
HEAD_DIM = HIDDEN // HEADS
H, D = HIDDEN, HEAD_DIM
# parameters one head owns, from each family's modelling code: its rows of the q/k/v projections (weights
# and biases where the family has them) and its input columns of the output projection; DeBERTa-v2 adds its
# two relative-position projections, ModernBERT has no biases
PER_HEAD = {"bert": 3 * (H * D + D) + H * D, "roberta": 3 * (H * D + D) + H * D,
            "distilbert": 3 * (H * D + D) + H * D, "gpt2": 3 * (H * D + D) + H * D,
            "deberta-v2": 5 * (H * D + D) + H * D, "roformer": 3 * (H * D + D) + H * D,
            "modernbert": 4 * H * D, "bart": 3 * (H * D + D) + H * D}

# {layer: heads} to prune: one head, several across layers, a whole layer, everything but one head
PRUNINGS = [{0: [1]}, {1: [3]}, {0: [0, 2], 1: [1]}, {1: [0, 1, 2, 3]}, {0: [0, 1, 2, 3], 1: [0, 2, 3]}]


def _layers(model) -> int:
    """Layers the scores cover: BART's 2 encoder + 2 decoder layers, 2 elsewhere."""
    return 2 * LAYERS if model.config.is_encoder_decoder else LAYERS


def _mask_for(heads: dict[int, list[int]], layers: int = LAYERS) -> torch.Tensor:
    mask = torch.ones(layers, HEADS)
    for layer, hs in heads.items():
        mask[layer, hs] = 0.0
    return mask


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _labelled(model, batch=4, length=9, seed=3):
    b = random_batch(model, batch=batch, length=length, seed=seed)
    b["labels"] = torch.tensor([0, 1, 1, 0][:batch])
    return b


@pytest.fixture(params=SUPPORTED)
def supported(request):
    return request.param


@pytest.mark.parametrize("heads", PRUNINGS, ids=lambda h: str(h).replace(" ", ""))
def test_pruned_equals_masked(supported, heads):
    batch = random_batch(make_tiny(supported))
    reference = make_tiny(supported)
    with head_masks(reference, _mask_for(heads, _layers(reference))):
        want = _logits(reference, batch)
    assert not torch.allclose(want, _logits(reference, batch), atol=1e-5)  # the heads do matter

    model = make_tiny(supported)
    record = prune_heads(model, heads)
    assert record == {k: sorted(v) for k, v in heads.items()}
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)


def test_pruning_is_cumulative_with_original_indices(supported):
    batch = random_batch(make_tiny(supported))
    reference = make_tiny(supported)
    with head_masks(reference, _mask_for({0: [0, 2, 3], 1: [1, 2]}, _layers(reference))):
        want = _logits(reference, batch)
    model = make_tiny(supported)
    prune_heads(model, {0: [2]})
    prune_heads(model, {0: [0, 2], 1: [2]})  # head 2 again: ignored
    record = prune_heads(model, {"0": [3], "1": [1]})  # string keys, as read back from JSON
    assert record == {0: [0, 2, 3], 1: [1, 2]}
    assert getattr(model.config, CONFIG_KEY) == {"0": [0, 2, 3], "1": [1, 2]}
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    # finishing a layer off after partial pruning, then pruning it again, still works
    prune_heads(model, {0: [1]})
    prune_heads(model, {0: [1]})
    with head_masks(reference, _mask_for({0: [0, 1, 2, 3], 1: [1, 2]}, _layers(reference))):
        want = _logits(reference, batch)
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)


def test_empty_layer_uses_zero_head_attention(supported):
    model = make_tiny(supported)
    prune_heads(model, {1: [0, 1, 2, 3]})
    assert any(isinstance(m, ZeroHeadAttention) for m in model.modules())
    batch = random_batch(model)
    assert torch.isfinite(_logits(model, batch)).all()


@pytest.mark.parametrize("heads", PRUNINGS[2:], ids=lambda h: str(h).replace(" ", ""))
def test_parameter_count(supported, heads):
    model = make_tiny(supported)
    before = count_parameters(model)
    prune_heads(model, heads)
    n = sum(len(v) for v in heads.values())
    assert count_parameters(model) == before - n * PER_HEAD[supported]


def test_trainable_flags_survive_surgery():
    model = make_tiny("bert")
    model.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    prune_heads(model, {0: [1]})
    assert not model.bert.encoder.layer[0].attention.self.query.weight.requires_grad
    assert model.bert.encoder.layer[0].attention.self.key.weight.requires_grad


def test_save_and_reload(supported, tmp_path):
    model = make_tiny(supported)
    prune_heads(model, {0: [1, 3], 1: [0, 1, 2, 3]})
    batch = random_batch(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY] == {"0": [1, 3], "1": [0, 1, 2, 3]}
    loaded = load_pruned(tmp_path)
    assert not loaded.training
    assert count_parameters(loaded) == count_parameters(model)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), atol=0, rtol=0)
    prune_heads(loaded, {0: [0]})  # a reloaded model keeps pruning with original indices
    assert pruned_heads_of(loaded.config) == {0: [0, 1, 3], 1: [0, 1, 2, 3]}


def test_reapply_pruning_on_full_model():
    pruned = make_tiny("bert")
    prune_heads(pruned, {0: [2], 1: [0, 3]})
    full = make_tiny("bert")  # same seed: same weights before surgery
    full.config.diffprune_pruned_heads = dict(pruned.config.diffprune_pruned_heads)
    assert reapply_pruning(full) == {0: [2], 1: [0, 3]}
    assert reapply_pruning(full) == {0: [2], 1: [0, 3]}  # already applied: left as is
    batch = random_batch(full)
    torch.testing.assert_close(_logits(full, batch), _logits(pruned, batch), atol=0, rtol=0)


def test_stale_record_is_an_error():
    model = make_tiny("bert")
    prune_heads(model, {0: [1]})
    model.config.diffprune_pruned_heads = {}
    with pytest.raises(DiffpruneError, match="does not match"):
        prune_heads(model, {1: [0]})


@pytest.mark.parametrize("heads, match", [({5: [0]}, "layer 5"), ({0: [4]}, r"head\(s\) \[4\]"),
                                          ({0: "x"}, "layer index")])
def test_bad_heads_are_errors(heads, match):
    with pytest.raises(DiffpruneError, match=match):
        prune_heads(make_tiny("bert"), heads)


def test_unsupported_arch_is_an_error():
    """T5 adds one per-head relative position bias (computed in its first layer) in every layer."""
    model = make_tiny("t5")
    with pytest.raises(DiffpruneError, match="t5: T5 shares one per-head relative position bias"):
        head_importance(model, [_labelled(model)])
    with pytest.raises(DiffpruneError, match="t5"):
        prune_heads(model, {0: [0]})


def test_shared_layer_pruned_equals_masked():
    """ALBERT applies its one layer twice: pruning its heads equals masking them in both applications."""
    batch = random_batch(make_tiny("albert"))
    reference = make_tiny("albert")
    with head_masks(reference, _mask_for({0: [1, 2]}, 1)):
        want = _logits(reference, batch)
    assert not torch.allclose(want, _logits(reference, batch), atol=1e-5)
    model = make_tiny("albert")
    before = count_parameters(model)
    assert prune_heads(model, {0: [1, 2]}) == {0: [1, 2]}
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    assert count_parameters(model) == before - 2 * (3 * (H * D + D) + H * D)


@pytest.mark.parametrize("family", GQA)
def test_gqa_prunes_whole_key_value_groups(family):
    """Naming one query head removes its key/value group: the logits equal the model with both query heads of
    the group masked, and the parameters removed are 2 query heads' rows + output columns and 1 k/v head."""
    batch = random_batch(make_tiny(family))
    reference = make_tiny(family)
    with head_masks(reference, _mask_for({0: [0, 1], 1: [2, 3]})):
        want = _logits(reference, batch)
    model = make_tiny(family)
    before = count_parameters(model)
    record = prune_heads(model, {0: [1], 1: [2]})
    assert record == {0: [0, 1], 1: [2, 3]}
    torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=1e-5)
    bias = D if family == "qwen2" else 0  # Qwen2: q/k/v biases; Llama: no biases at all
    per_group = 2 * (H * D + bias) + 2 * (H * D + bias) + 2 * H * D  # 2 q heads, 1 k + 1 v head, 2 out columns
    assert count_parameters(model) == before - 2 * per_group
    prune_heads(model, {0: [2]})  # layer 0 loses its last group: the residual path stays
    assert torch.isfinite(_logits(model, batch)).all()
    assert any(isinstance(m, ZeroHeadAttention) for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# Importance


def test_importance_shape_norm_and_frozen_params(supported):
    model = make_tiny(supported)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]  # RoFormer's sinusoidal positions are frozen
    batches = [_labelled(model, seed=s) for s in range(2)]
    scores = head_importance(model, batches)
    LAYERS = _layers(model)  # noqa: N806
    assert scores.shape == (LAYERS, HEADS)
    torch.testing.assert_close(scores.norm(dim=1), torch.ones(LAYERS))
    assert (scores >= 0).all()
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags  # flags restored
    assert model.training  # mode restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_importance_matches_finite_differences(supported):
    if supported == "deberta-v2":
        pytest.skip("DeBERTa-v2's disentangled attention computes in float32 even in a .double() model, so "
                    "finite differences of its loss are too noisy to check gradients against")
    torch.manual_seed(0)
    model = make_tiny(supported).double()
    batch = _labelled(model, batch=3, length=8)
    batch["attention_mask"][0, -3:] = 0  # padding: only 24 - 3 = 21 tokens count
    tokens = 21
    raw = head_importance(model, [batch], normalize=False).double()
    LAYERS = _layers(model)  # noqa: N806

    def loss(mask):
        with head_masks(model, mask), torch.no_grad():
            return model(**batch).loss.item()

    exact = supported in ("bert", "roberta", "distilbert", "gpt2", "roformer")
    eps = 1e-5 if exact else 1e-3  # central differences: O(eps²) error, well under the tolerance below
    expected = torch.zeros(LAYERS, HEADS, dtype=torch.float64)
    for layer in range(LAYERS):
        for head in range(HEADS):
            up, down = torch.ones(LAYERS, HEADS, dtype=torch.float64), torch.ones(LAYERS, HEADS, dtype=torch.float64)
            up[layer, head] += eps
            down[layer, head] -= eps
            expected[layer, head] = abs(loss(up) - loss(down)) / (2 * eps) / tokens
    # DeBERTa-v2, ModernBERT and BART keep float32 pieces (relative-position / rotary tables, embedding scales)
    # even in a .double() model, so their finite differences carry float32 noise
    torch.testing.assert_close(raw, expected, **(dict(rtol=1e-4, atol=1e-9) if exact else dict(rtol=2e-3, atol=1e-6)))
    normalized = head_importance(model, [batch]).double()
    tol = dict(rtol=1e-4, atol=1e-6) if exact else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(normalized, expected / expected.norm(dim=1, keepdim=True), **tol)


def test_importance_accumulates_abs_per_batch():
    model = make_tiny("bert")
    b1, b2 = _labelled(model, seed=1), _labelled(model, seed=2)
    s1 = head_importance(model, [b1], normalize=False) * 36
    s2 = head_importance(model, [b2], normalize=False) * 36
    both = head_importance(model, [b1, b2], normalize=False) * 72
    torch.testing.assert_close(both, s1 + s2)


def test_importance_of_pruned_model_marks_pruned_heads_nan():
    model = make_tiny("bert")
    prune_heads(model, {0: [1], 1: [0, 1, 2, 3]})
    scores = head_importance(model, [_labelled(model)])
    assert torch.isnan(scores[0, 1]) and torch.isnan(scores[1]).all()
    assert torch.isfinite(scores[0, [0, 2, 3]]).all()
    assert select_heads_to_prune(scores, count=3) == {0: [0, 2, 3]}


def test_importance_needs_labels():
    model = make_tiny("bert")
    with pytest.raises(DiffpruneError, match="labels"):
        head_importance(model, [random_batch(model)])
    with pytest.raises(DiffpruneError, match="no tokens"):
        head_importance(model, [])


def test_select_heads_to_prune():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.05, 0.7]])
    assert select_heads_to_prune(scores, count=3) == {0: [1], 1: [0, 2]}
    assert select_heads_to_prune(scores, count=0) == {}
    assert select_heads_to_prune(scores, fraction=0.5) == {0: [1, 3], 1: [0, 2]}
    assert select_heads_to_prune(scores, threshold=0.3) == {0: [1], 1: [0, 2]}
    ties = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert select_heads_to_prune(ties, count=2) == {0: [0, 1]}
    for kwargs in ({}, {"count": 1, "fraction": 0.1}, {"count": 9}, {"fraction": 1.5}, {"count": 1.5}):
        with pytest.raises(DiffpruneError):
            select_heads_to_prune(scores, **kwargs)


def test_save_load_and_plot(tmp_path):
    scores = torch.tensor([[0.6, 0.8, float("nan")], [1.0, 0.0, 0.0]])
    files = save_importance(scores, tmp_path, {"task": "rte"})
    data = json.loads(files["json"].read_text())
    assert data["scores"][0] == [pytest.approx(0.6), pytest.approx(0.8), None]
    assert [(r["layer"], r["head"]) for r in data["ranking"]][:2] == [(1, 0), (0, 1)]
    assert len(data["ranking"]) == 5 and data["meta"] == {"task": "rte"}
    assert data["layer_importance"] == [pytest.approx(1.4), pytest.approx(1.0)]
    loaded = load_importance(tmp_path)
    torch.testing.assert_close(loaded.scores, scores, equal_nan=True)
    assert loaded.meta == {"task": "rte"}
    png = plot_importance(scores, tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_importance_end_to_end(tiny_model_dir, tmp_path):
    from diffprune.heads import run_importance
    from diffprune.tasks import demo_task, write_demo_data

    data = write_demo_data(tmp_path / "data", n_train=40, n_dev=8)
    out = run_importance(str(tiny_model_dir), demo_task(data), data, tmp_path / "out", num_examples=24,
                         batch_size=8, max_length=32, seed=0)
    assert len(out["scores"]) == LAYERS and len(out["ranking"]) == LAYERS * HEADS
    assert out["meta"]["num_examples"] == 24
    for name in ("importance.json", "importance.safetensors", "importance.png"):
        assert (tmp_path / "out" / name).is_file()


def test_gqa_selection_picks_whole_groups():
    """Groups of 2: a group scores its heads' mean; count 2 query heads = the one weakest group."""
    scores = torch.tensor([[0.9, 0.1, 0.4, 0.5], [0.2, 0.3, 0.8, 0.9]])  # group means: .5 .45 / .25 .85
    assert select_heads_to_prune(scores, count=2, group=2) == {1: [0, 1]}
    assert select_heads_to_prune(scores, fraction=0.5, group=2) == {0: [2, 3], 1: [0, 1]}
    assert select_heads_to_prune(scores, threshold=0.48, group=2) == {0: [2, 3], 1: [0, 1]}
