"""TaskSwitcher: after any sequence of switches the weights are bit for bit those `apply_diff` gives on a
fresh copy of the base; deactivating gives the base back bit for bit; every check happens at `add`."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import make_tiny, random_batch

from diffprune import DiffpruneError, TaskSwitcher
from diffprune.storage import SparseDelta, TaskDiff, apply_diff, fingerprint

HEAD = ("classifier.weight", "classifier.bias")


def random_diff(model, seed: int, labels: int | None = 2, share: float = 0.05, dense_extra=(),
                sparse_head: bool = False, method: str = "diff-pruning") -> TaskDiff:
    """Random sparse δ over every non-head tensor (sorted distinct positions), a dense head of `labels`
    outputs (1 for regression: labels None), and dense replacements for the names in `dense_extra`."""
    g = torch.Generator().manual_seed(seed)
    sparse, dense = {}, {}
    for name, p in model.named_parameters():
        if name in dense_extra or (name in HEAD and not sparse_head):
            continue
        k = max(1, int(p.numel() * share))
        idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
        sparse[name] = SparseDelta(tuple(p.shape), idx, torch.randn(k, generator=g) * 0.1)
    for name in dense_extra:
        dense[name] = torch.randn(model.get_parameter(name).shape, generator=g)
    if not sparse_head:
        out = 1 if labels is None else labels
        hidden = model.get_parameter("classifier.weight").shape[1]
        dense["classifier.weight"] = torch.randn(out, hidden, generator=g)
        dense["classifier.bias"] = torch.randn(out, generator=g)
    names = None if labels is None else [f"l{i}" for i in range(labels)]
    return TaskDiff(method, "tiny", f"task{seed}", names, {}, sparse, dense)


def reference(base, diff: TaskDiff | None):
    """A fresh copy of the base with `diff` applied by apply_diff (head reshaped first where it differs)."""
    ref = copy.deepcopy(base)
    if diff is not None:
        for name, value in diff.dense.items():
            param = ref.get_parameter(name)
            if param.shape != value.shape:
                param.data = torch.zeros(value.shape, dtype=param.dtype)
        apply_diff(ref, diff)
    return ref


def assert_same_weights(model, ref) -> None:
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


@pytest.fixture
def base():
    return make_tiny("bert", num_labels=2)


def task_set(base):
    return {"two": random_diff(base, 1, labels=2),
            "three": random_diff(base, 2, labels=3),
            "reg": random_diff(base, 3, labels=None),
            # BitFit-like dense replacements outside the head, and a head diffed sparsely
            "dense": random_diff(base, 4, labels=2, dense_extra=("bert.encoder.layer.0.output.dense.bias",
                                                                 "bert.embeddings.LayerNorm.weight")),
            "sparsehead": random_diff(base, 5, labels=2, sparse_head=True)}


@pytest.mark.parametrize("pack,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_random_switch_sequences_match_apply_diff_bit_for_bit(base, pack, dtype):
    """bfloat16 too: apply_diff adds in float32 and casts, and the switcher's precomputed values must agree."""
    base = base.to(dtype)
    original = copy.deepcopy(base)
    tasks = task_set(base)
    refs = {name: reference(original, diff) for name, diff in tasks.items()}
    refs[None] = original
    switcher = TaskSwitcher(base, pack=pack)
    assert_same_weights(base, original)  # packing keeps every value
    for name, diff in tasks.items():
        switcher.add(name, diff)
    assert_same_weights(base, original)  # add never writes the model
    assert switcher.active is None and switcher.tasks == list(tasks)
    rng = random.Random(0)
    batch = random_batch(base)
    for _ in range(40):
        name = rng.choice([*tasks, None])
        switcher.activate(name)
        assert switcher.active == name
        assert_same_weights(base, refs[name])
    for name in (*tasks, "two", "two"):  # switching to the active task again changes nothing
        switcher.activate(name)
        with torch.no_grad():
            assert torch.equal(base(**batch).logits, refs[name](**batch).logits)
    switcher.deactivate()
    assert_same_weights(base, original)


def test_add_while_a_task_is_active_sees_the_base(base):
    """Base values at a new diff's positions come from the saved base, not from the active task's weights;
    the fingerprint is checked against the base too."""
    original = copy.deepcopy(base)
    first, second = random_diff(base, 1, share=0.3), random_diff(base, 2, share=0.3, labels=3)
    second.fingerprint = fingerprint(original, second.fingerprint_names())
    dense = random_diff(base, 4, dense_extra=("bert.encoder.layer.0.output.dense.bias",))
    switcher = TaskSwitcher(base)
    switcher.add("first", first)
    switcher.activate("first")
    switcher.add("second", second)  # overlaps `first` at ~30% of its positions
    switcher.add("dense", dense)
    assert_same_weights(base, reference(original, first))
    for name, diff in (("second", second), ("dense", dense), ("first", first)):
        switcher.activate(name)
        assert_same_weights(base, reference(original, diff))
    switcher.remove("first")  # removing the active task puts the base back
    assert switcher.active is None and switcher.tasks == ["second", "dense"]
    assert_same_weights(base, original)


def test_checks_happen_at_add_and_leave_the_model_alone(base):
    original = copy.deepcopy(base)
    switcher = TaskSwitcher(base)
    good = random_diff(base, 1)
    switcher.add("good", good)
    switcher.activate("good")
    applied = reference(original, good)

    bad_shape = random_diff(base, 2)
    bad_shape.sparse["bert.pooler.dense.bias"] = SparseDelta((7,), torch.tensor([0]), torch.tensor([1.0]))
    unknown = random_diff(base, 3)
    unknown.sparse["nope.weight"] = SparseDelta((2,), torch.tensor([0]), torch.tensor([1.0]))
    wrong_base = random_diff(base, 4)
    wrong_base.fingerprint = fingerprint(make_tiny("bert", seed=7), wrong_base.fingerprint_names())
    bad_head = random_diff(base, 5)
    bad_head.dense["classifier.weight"] = torch.zeros(2, 5)
    lora = random_diff(base, 6, method="lora")
    cases = [(bad_shape, "shape mismatch"), (unknown, "no parameter"), (wrong_base, "fingerprint"),
             (bad_head, "number of outputs"), (lora, "adds modules"), (good, "already in the switcher")]
    for diff, message in cases:
        with pytest.raises(DiffpruneError, match=message):
            switcher.add("good" if diff is good else "x", diff)
        assert switcher.tasks == ["good"]
        assert_same_weights(base, applied)
    with pytest.raises(DiffpruneError, match="no task 'x'"):
        switcher.activate("x")
    assert switcher.active == "good"


def test_memory_accounting(base):
    switcher = TaskSwitcher(base)
    diff = random_diff(base, 1)
    switcher.add("a", diff)
    # int64 position + base value + task value (float32) per nonzero, and the head copy
    dense = sum(t.numel() * 4 for t in diff.dense.values())
    assert switcher.nbytes("a") == diff.nnz * 16 + dense
    assert switcher.nbytes() == diff.nnz * 16 + 2 * dense  # + the saved base head


def test_a_packed_model_saves_and_reloads_as_before(base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    want = {k: v.clone() for k, v in base.state_dict().items()}
    TaskSwitcher(base)  # packs the parameters into one buffer
    base.save_pretrained(tmp_path)
    got = AutoModelForSequenceClassification.from_pretrained(tmp_path).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
