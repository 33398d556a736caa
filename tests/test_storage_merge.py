"""Task-diff storage, part 2: merging into a standalone model, and the statistics `inspect` shows."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny, random_batch
from diffprune.errors import DiffpruneError
from diffprune.storage import CONFIG_FILE, TENSOR_FILE, apply_diff, diff_stats, layer_group, merge_diff, save_diff
from test_storage import make_diff, state, assert_same_state

# ------------------------------------------------------------------------------------------ merge

def test_merge_reloads_with_plain_transformers(tmp_path, arch):
    model = make_tiny(arch, num_labels=3)
    diff, _ = make_diff(model, label_names=("contradiction", "entailment", "neutral"))
    out = merge_diff(model, diff, tmp_path / "merged")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    batch = random_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
        got = reloaded(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert reloaded.config.id2label == {0: "contradiction", 1: "entailment", 2: "neutral"}
    assert reloaded.config.label2id["neutral"] == 2
    # and the merged model is the applied diff, not the base
    base = make_tiny(arch, num_labels=3)
    apply_diff(base, diff)
    with torch.no_grad():
        assert torch.allclose(base(**batch).logits, expected, atol=1e-6)


def test_merge_keeps_default_looking_label_names_so_bart_reloads_with_two_labels(tmp_path):
    """transformers drops LABEL_0/LABEL_1 from a saved config; BART's own default is 3 labels."""
    model = make_tiny("bart", num_labels=2)
    diff, _ = make_diff(model, label_names=("LABEL_0", "LABEL_1"))
    out = merge_diff(model, diff, tmp_path / "merged")
    batch = random_batch(model)
    with torch.no_grad():
        expected = model(**batch).logits
        got = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits
    assert got.shape == (batch["input_ids"].shape[0], 2) and torch.allclose(got, expected, atol=1e-5)


def test_merge_regression_sets_problem_type(tmp_path):
    model = make_tiny("bert", num_labels=1)
    diff, _ = make_diff(model, label_names=None)
    merge_diff(model, diff, tmp_path / "m")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").config.problem_type == "regression"


def test_failed_merge_restores_the_model(tmp_path, monkeypatch):
    model = make_tiny("bert")
    before = state(model)
    id2label = dict(model.config.id2label)
    diff, _ = make_diff(model, label_names=("x", "y"))
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        merge_diff(model, diff, tmp_path / "m")
    assert_same_state(state(model), before)
    assert model.config.id2label == id2label
    assert list(tmp_path.iterdir()) == []


def test_merge_label_count_mismatch(tmp_path):
    model = make_tiny("bert", num_labels=2)
    diff, _ = make_diff(model, label_names=("a", "b"))
    diff.label_names = ["a", "b", "c"]
    with pytest.raises(DiffpruneError, match="3 labels"):
        merge_diff(model, diff, tmp_path / "m")


# ------------------------------------------------------------------------------------------ stats

def test_layer_groups():
    assert layer_group("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_group("transformer.wte.weight") == "embeddings"
    assert layer_group("bert.encoder.layer.11.attention.self.query.weight") == "layer.11"
    assert layer_group("distilbert.transformer.layer.0.ffn.lin1.weight") == "layer.0"
    assert layer_group("transformer.h.3.attn.c_attn.weight") == "layer.3"
    assert layer_group("model.layers.2.mlp.up_proj.weight") == "layer.2"
    assert layer_group("classifier.out_proj.weight") == "head"
    assert layer_group("pre_classifier.bias") == "head"
    assert layer_group("score.weight") == "head"
    assert layer_group("bert.pooler.dense.weight") == "other"
    assert layer_group("transformer.ln_f.weight") == "other"


def test_diff_stats(tmp_path):
    model = make_tiny("bert")
    diff, deltas = make_diff(model)
    out = save_diff(diff, tmp_path / "d", model)
    s = diff_stats(diff, out)
    nnz = sum(int((d != 0).sum()) for d in deltas.values())
    assert s["nnz"] == nnz == diff.nnz
    assert sum(s["nnz_by_layer"].values()) == nnz
    assert s["nnz_by_tensor"] == {n: int((d != 0).sum()) for n, d in sorted(deltas.items())}
    d = sum(x.numel() for x in deltas.values())
    assert s["num_diff_params"] == d and s["sparsity"] == pytest.approx(nnz / d)
    assert s["dense_params"] == sum(t.numel() for t in diff.dense.values())
    assert set(s["dense_params_by_layer"]) == {"head"}
    assert s["sparse_bytes_per_nnz"] == 8.0  # int32 positions + float32 values, read from the file
    assert diff_stats(diff)["sparse_bytes_per_nnz"] == 8.0
    assert s["stored_bytes"] == (out / TENSOR_FILE).stat().st_size + (out / CONFIG_FILE).stat().st_size
    assert diff_stats(diff)["stored_bytes"] is None
    diff.extra["num_diff_params"] = 10 * d  # recorded by the method: includes tensors with no nonzeros
    assert diff_stats(diff)["sparsity"] == pytest.approx(nnz / (10 * d))
