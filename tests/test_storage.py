"""Task-diff storage: format round trip, fingerprint, apply / revert / merge, corruption and atomicity."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from conftest import make_tiny
from diffprune.errors import DiffpruneError
from diffprune.storage import (
    CONFIG_FILE,
    TENSOR_FILE,
    SparseDelta,
    TaskDiff,
    apply_diff,
    fingerprint,
    load_diff,
    save_diff,
)

HEAD_PREFIXES = ("classifier", "score", "pre_classifier")


def head_names(model):
    return [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)]


def random_dense_delta(shape, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    return torch.randn(shape, generator=g) * 0.1 * mask


def make_diff(model, seed=0, n_sparse=4, label_names=("neg", "pos")):
    """A diff with sparse deltas on a few pretrained matrices and a new dense head; returns (diff, deltas)."""
    heads = set(head_names(model))
    body = [(n, p) for n, p in model.named_parameters() if n not in heads and p.dim() == 2]
    g = torch.Generator().manual_seed(seed + 100)
    chosen = [body[i] for i in sorted(torch.randperm(len(body), generator=g)[:n_sparse].tolist())]
    deltas = {n: random_dense_delta(p.shape, seed=seed + i) for i, (n, p) in enumerate(chosen)}
    dense = {n: torch.randn(model.get_parameter(n).shape, generator=g) for n in sorted(heads)}
    diff = TaskDiff(method="diff-pruning", base_model="tiny", task="sst2",
                    label_names=list(label_names) if label_names else None,
                    config={"sparsity": 0.005, "lr": 5e-5},
                    sparse={n: SparseDelta.from_dense(d) for n, d in deltas.items()},
                    dense=dense, extra={"num_labels": model.config.num_labels})
    return diff, deltas


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def assert_same_diff(a: TaskDiff, b: TaskDiff):
    for f in ("method", "base_model", "task", "label_names", "config", "extra", "fingerprint"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.sparse.keys() == b.sparse.keys() and a.dense.keys() == b.dense.keys()
    for n in a.sparse:
        assert a.sparse[n].shape == b.sparse[n].shape
        assert torch.equal(a.sparse[n].indices.long(), b.sparse[n].indices)
        assert b.sparse[n].indices.dtype == torch.int64 and b.sparse[n].values.dtype == torch.float32
        assert torch.equal(a.sparse[n].values, b.sparse[n].values)
    for n in a.dense:
        assert torch.equal(a.dense[n], b.dense[n])


# ------------------------------------------------------------------------------------------ SparseDelta

def test_sparse_delta_round_trip_keeps_exactly_the_nonzeros():
    dense = random_dense_delta((7, 5), density=0.3)
    dense[0, 0] = 0.0
    sd = SparseDelta.from_dense(dense)
    assert sd.nnz == int((dense != 0).sum())
    assert sd.indices.dtype == torch.int64 and sd.values.dtype == torch.float32
    assert bool((sd.indices[1:] > sd.indices[:-1]).all())
    assert torch.equal(sd.to_dense(), dense)
    empty = SparseDelta.from_dense(torch.zeros(3, 4))
    assert empty.nnz == 0 and torch.equal(empty.to_dense(), torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------ apply / revert

def test_apply_matches_manual_dense_addition_and_revert_is_bit_exact():
    model = make_tiny("bert")
    before = state(model)
    diff, deltas = make_diff(model)
    applied = apply_diff(model, diff)
    after = state(model)
    for n, p in after.items():
        if n in deltas:
            assert torch.equal(p, before[n] + deltas[n]), n
        elif n in diff.dense:
            assert torch.equal(p, diff.dense[n]), n
        else:
            assert torch.equal(p, before[n]), n
    applied.revert()
    assert_same_state(state(model), before)
    applied.revert()  # idempotent
    assert_same_state(state(model), before)


def test_apply_as_context_manager_reverts():
    model = make_tiny("distilbert")
    before = state(model)
    diff, _ = make_diff(model)
    with apply_diff(model, diff):
        assert not torch.equal(model.get_parameter(next(iter(diff.sparse))), before[next(iter(diff.sparse))])
    assert_same_state(state(model), before)


def test_tied_weight_is_touched_once():
    model = make_tiny("bert")
    emb = model.bert.embeddings.word_embeddings
    model.tied_head = torch.nn.Linear(32, emb.weight.shape[0], bias=False)
    model.tied_head.weight = emb.weight  # one tensor, two modules
    names = [n for n, _ in model.named_parameters()]
    assert "tied_head.weight" not in names  # named_parameters() deduplicates
    before = emb.weight.detach().clone()
    delta = random_dense_delta(before.shape)
    diff = TaskDiff("diff-pruning", "tiny", "t", None, {}, {"bert.embeddings.word_embeddings.weight":
                                                             SparseDelta.from_dense(delta)}, {})
    apply_diff(model, diff)
    assert torch.equal(emb.weight, before + delta) and torch.equal(model.tied_head.weight, before + delta)
    both = TaskDiff("diff-pruning", "tiny", "t", None, {},
                    {"bert.embeddings.word_embeddings.weight": SparseDelta.from_dense(delta),
                     "tied_head.weight": SparseDelta.from_dense(delta)}, {})
    with pytest.raises(DiffpruneError, match="same tied tensor"):
        apply_diff(model, both)


def test_unknown_name_and_shape_mismatch_modify_nothing():
    model = make_tiny("bert")
    before = state(model)
    diff, _ = make_diff(model)
    diff.sparse["bert.encoder.layer.7.output.dense.weight"] = SparseDelta.from_dense(torch.ones(32, 64))
    with pytest.raises(DiffpruneError, match=r"layer\.7"):
        apply_diff(model, diff)
    assert_same_state(state(model), before)

    diff, _ = make_diff(model)
    head = sorted(diff.dense)[-1]
    diff.dense[head] = torch.zeros(5)
    with pytest.raises(DiffpruneError, match=head.replace(".", r"\.")):
        apply_diff(model, diff)
    assert_same_state(state(model), before)


# ------------------------------------------------------------------------------------------ fingerprint

def test_fingerprint_detects_a_tiny_base_change_and_mismatch_modifies_nothing(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    save_diff(diff, tmp_path / "d", model)
    assert diff.fingerprint == fingerprint(model, diff.sparse)
    loaded = load_diff(tmp_path / "d")

    other = make_tiny("bert")
    name = sorted(diff.sparse)[0]
    with torch.no_grad():
        other.get_parameter(name).view(-1)[3] += 1e-6
    assert fingerprint(other, diff.sparse) != diff.fingerprint
    before = state(other)
    with pytest.raises(DiffpruneError, match=r"fingerprint .*different pretrained weights.*'tiny'"):
        apply_diff(other, loaded)
    assert_same_state(state(other), before)
    apply_diff(other, loaded, check_fingerprint=False)  # explicit opt-out still works

    # a change in a tensor the diff does not touch does not matter
    third = make_tiny("bert")
    untouched = next(n for n, _ in third.named_parameters() if n not in diff.sparse and n not in diff.dense)
    with torch.no_grad():
        third.get_parameter(untouched).add_(1.0)
    apply_diff(third, loaded)


def test_fingerprint_covers_listed_dense_names():
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    bias = "bert.encoder.layer.0.output.dense.bias"
    diff.dense[bias] = torch.zeros(32)
    assert bias not in diff.fingerprint_names()
    diff.config["fingerprint_dense"] = [bias]
    assert bias in diff.fingerprint_names()
    # head-only diffs (nothing to fingerprint) get None instead of a hash of nothing
    head_only = TaskDiff("linear-probe", "tiny", "t", ["a", "b"], {}, {},
                         {n: model.get_parameter(n).detach().clone() for n in head_names(model)})
    assert head_only.fingerprint_names() == []


# ------------------------------------------------------------------------------------------ save / load

def test_save_load_round_trip(tmp_path):
    model = make_tiny("roberta", num_labels=3)
    diff, _ = make_diff(model, label_names=("a", "b", "c"))
    diff.sparse["roberta.encoder.layer.1.output.LayerNorm.bias"] = SparseDelta.from_dense(torch.zeros(32))
    diff.extra["metrics"] = {"accuracy": 0.5}
    out = save_diff(diff, tmp_path / "diff", model)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, TENSOR_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["diff"]  # no temp dir left
    loaded = load_diff(out)
    assert_same_diff(diff, loaded)
    assert loaded.nnz == diff.nnz
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["format_version"] == 2 and meta["nnz"] == diff.nnz
    assert meta["coding"]["values"]["dtype"] == "float32" and loaded.value_dtype == "float32"
    stored = safetensors.torch.load_file(str(out / TENSOR_FILE))
    assert {k for k in stored if k.startswith("sparse.")} == {"sparse.positions", "sparse.values"}
    # a loaded diff applies like the original
    m1, m2 = make_tiny("roberta", num_labels=3), make_tiny("roberta", num_labels=3)
    apply_diff(m1, diff)
    apply_diff(m2, loaded)
    assert_same_state(state(m1), state(m2))


def test_regression_diff_round_trip(tmp_path):
    model = make_tiny("gpt2", num_labels=1)
    diff, _ = make_diff(model, label_names=None)
    save_diff(diff, tmp_path / "d", model)
    assert load_diff(tmp_path / "d").label_names is None


def test_indices_fall_back_to_int64_for_huge_tensors(tmp_path):
    shape = (1 << 16, 1 << 16)  # 2^32 elements: never materialised
    delta = SparseDelta(shape, torch.tensor([0, 5, (1 << 32) - 1]), torch.tensor([1.0, 2.0, 3.0]))
    diff = TaskDiff("diff-pruning", "x", "t", None, {}, {"huge.weight": delta}, {})
    save_diff(diff, tmp_path / "d", None, format_version=1)
    assert safetensors.torch.load_file(str(tmp_path / "d" / TENSOR_FILE))["sparse.huge.weight.indices"].dtype \
        == torch.int64
    assert torch.equal(load_diff(tmp_path / "d").sparse["huge.weight"].indices, delta.indices)
    save_diff(diff, tmp_path / "v2", None)  # version 2's varint gaps hold any 64-bit position
    assert torch.equal(load_diff(tmp_path / "v2").sparse["huge.weight"].indices, delta.indices)


@pytest.fixture
def saved(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    return save_diff(diff, tmp_path / "diff", model)


@pytest.fixture
def saved_v1(tmp_path):
    """Version 1 (per-tensor int32 indices + float32 values), whose tensors the checks below edit."""
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    return save_diff(diff, tmp_path / "diff", model, format_version=1)


def test_load_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(DiffpruneError, match="not found"):
        load_diff(tmp_path / "nope")
    (saved / TENSOR_FILE).unlink()
    with pytest.raises(DiffpruneError, match="missing"):
        load_diff(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(DiffpruneError, match="missing"):
        load_diff(saved)


def test_load_bad_json_and_unknown_version(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(DiffpruneError, match="not valid JSON"):
        load_diff(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DiffpruneError, match="version 99"):
        load_diff(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(DiffpruneError, match="not a diffprune task diff"):
        load_diff(saved)


@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "without-checksum"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_load_corrupt_tensor_file(saved, damage, checksum):
    if not checksum:  # the safetensors parser itself must also catch it
        meta = json.loads((saved / CONFIG_FILE).read_text())
        del meta["tensor_file_sha256"]
        (saved / CONFIG_FILE).write_text(json.dumps(meta))
    path = saved / TENSOR_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37garbage" * 50)
    with pytest.raises(DiffpruneError, match="corrupt or truncated"):
        load_diff(saved)


def _rewrite(saved, mutate):
    """Change the stored tensors with `mutate(dict)`, keeping the checksum valid so the value checks run."""
    tensors = safetensors.torch.load_file(str(saved / TENSOR_FILE))
    mutate(tensors)
    safetensors.torch.save_file(tensors, str(saved / TENSOR_FILE))
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta.pop("tensor_file_sha256")
    (saved / CONFIG_FILE).write_text(json.dumps(meta))


def _first_sparse(tensors):
    return sorted(k[: -len(".indices")] for k in tensors if k.endswith(".indices"))[0]


@pytest.mark.parametrize("problem,match", [
    ("out_of_range", "out of range"),
    ("negative", "out of range"),
    ("length", "indices but"),
    ("unsorted", "strictly increasing"),
    ("duplicate", "strictly increasing"),
    ("missing_key", "lacks tensor"),
])
def test_load_inconsistent_data(saved_v1, problem, match):
    saved = saved_v1
    def mutate(t):
        k = _first_sparse(t)
        idx = t[k + ".indices"]
        if problem == "out_of_range":
            idx[-1] = 10**6
        elif problem == "negative":
            idx[0] = -1
        elif problem == "length":
            t[k + ".values"] = t[k + ".values"][:-1].clone()
        elif problem == "unsorted":
            t[k + ".indices"] = idx.flip(0).clone()
        elif problem == "duplicate":
            idx[1] = idx[0]
        elif problem == "missing_key":
            del t[k + ".values"]
    _rewrite(saved, mutate)
    with pytest.raises(DiffpruneError, match=match):
        load_diff(saved)


# ------------------------------------------------------------------------------------------ atomicity

def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model = make_tiny("bert")
    diff, _ = make_diff(model)

    def half_write_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_diff(diff, tmp_path / "diff", model)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_diff(tmp_path, monkeypatch):
    model = make_tiny("bert")
    old, _ = make_diff(model, seed=0)
    save_diff(old, tmp_path / "diff", model)
    new, _ = make_diff(model, seed=5)
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        save_diff(new, tmp_path / "diff", model)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["diff"]
    assert_same_diff(old, load_diff(tmp_path / "diff"))
    # a successful overwrite replaces it
    save_diff(new, tmp_path / "diff", model)
    assert_same_diff(new, load_diff(tmp_path / "diff"))
    assert [p.name for p in tmp_path.iterdir()] == ["diff"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(DiffpruneError, match="refusing to overwrite"):
        save_diff(diff, tmp_path / "home", model)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    save_diff(diff, tmp_path / "empty", model)  # an empty directory is fine


def test_non_json_config_fails_before_writing(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    diff.config["bad"] = object()
    with pytest.raises(DiffpruneError, match="JSON"):
        save_diff(diff, tmp_path / "d", model)
    assert list(tmp_path.iterdir()) == []


def test_flat_positions_offsets_each_tensor_in_layout_order():
    from diffprune.core.diff_vector import FlatLayout
    from diffprune.methods.sparse import flat_positions

    layout = FlatLayout(["a", "b", "c"], [(2, 3), (4,), (5,)])  # offsets 0, 6, 10
    diff = TaskDiff(method="m", base_model="", task="", label_names=None, config={}, dense={},
                    sparse={"c": SparseDelta((5,), torch.tensor([4, 0]), torch.tensor([1.0, 2.0])),
                            "a": SparseDelta((2, 3), torch.tensor([5]), torch.tensor([3.0]))})
    idx, vals = flat_positions(diff, layout)
    assert idx.tolist() == [5, 14, 10]  # a before c; within a tensor the stored order is kept
    assert vals.tolist() == [3.0, 1.0, 2.0]
    diff.sparse["z"] = SparseDelta((1,), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="outside this layout"):
        flat_positions(diff, layout)
    empty = TaskDiff(method="m", base_model="", task="", label_names=None, config={}, dense={}, sparse={})
    assert flat_positions(empty, layout)[0].numel() == 0
