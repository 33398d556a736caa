"""Composing diffs: sum / linear / TIES / DARE against hand-computed values, dense-part rules, base-model
refusal, and the `compose` / `convert` commands (refusals exit 2 and write nothing)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import VOCAB, make_tiny
from diffprune.cli import main
from diffprune.errors import DiffpruneError
from diffprune.storage import CONFIG_FILE, SparseDelta, TaskDiff, fingerprint, load_diff, save_diff
from diffprune.storage.compose import compose_diffs
from test_storage import make_diff

# two diffs of one 10-element tensor, small enough to work every method out by hand
A_IDX, A_VAL = [0, 2, 5, 7], [1.0, -2.0, 3.0, 0.5]
B_IDX, B_VAL = [2, 3, 5, 9], [1.0, 4.0, -1.0, -0.25]


def pair(dense_a=None, dense_b=None, extra_b=None):
    def one(idx, val, dense, more=None):
        sparse = {"t": SparseDelta((10,), torch.tensor(idx), torch.tensor(val))}
        sparse.update(more or {})
        return TaskDiff("diff-pruning", "base", "rte", ["a", "b"], {}, sparse, dense or {})
    return one(A_IDX, A_VAL, dense_a), one(B_IDX, B_VAL, dense_b, extra_b)


def entries(diff, name="t"):
    d = diff.sparse[name]
    return dict(zip(d.indices.tolist(), d.values.tolist()))


def test_sum_is_the_union_of_positions():
    a, b = pair(extra_b={"u": SparseDelta((3,), torch.tensor([1]), torch.tensor([7.0]))})
    out = compose_diffs([a, b])
    assert entries(out) == {0: 1.0, 2: -1.0, 3: 4.0, 5: 2.0, 7: 0.5, 9: -0.25}
    assert entries(out, "u") == {1: 7.0}  # a tensor only one diff touches is kept as it is


def test_exact_cancellation_is_not_stored():
    a, b = pair()
    b.sparse["t"] = SparseDelta((10,), torch.tensor([0]), torch.tensor([-1.0]))
    assert entries(compose_diffs([a, b])) == {2: -2.0, 5: 3.0, 7: 0.5}


def test_linear():
    out = compose_diffs(list(pair()), method="linear", weights=[0.5, 2.0])
    assert entries(out) == {0: 0.5, 2: 1.0, 3: 8.0, 5: -0.5, 7: 0.25, 9: -0.5}


def test_ties_trims_elects_the_sign_and_averages_the_agreeing_entries():
    # trim to the top half of each diff's own nonzeros: A keeps {2: -2, 5: 3}, B keeps {3: 4, 5: -1};
    # sign of the sum: 2 -, 3 +, 5 + (3 - 1); agreeing entries: 2 from A, 3 from B, 5 from A only
    out = compose_diffs(list(pair()), method="ties", density=0.5)
    assert entries(out) == {2: -2.0, 3: 4.0, 5: 3.0}
    weighted = compose_diffs(list(pair()), method="ties", density=0.5, weights=[2.0, 3.0])
    assert entries(weighted) == {2: -4.0, 3: 12.0, 5: 6.0}  # PEFT: the sign is elected before weighting
    # no trimming: position 5 gets +3 (A) and -1 (B) → sum +2 → only A's +3 agrees; 2: -2 + 1 → A's -2
    full = compose_diffs(list(pair()), method="ties", density=1.0)
    assert entries(full) == {0: 1.0, 2: -2.0, 3: 4.0, 5: 3.0, 7: 0.5, 9: -0.25}
    two_agree = list(pair())
    two_agree[1].sparse["t"] = SparseDelta((10,), torch.tensor([5]), torch.tensor([5.0]))
    assert entries(compose_diffs(two_agree, method="ties", density=1.0))[5] == 4.0  # mean of 3 and 5


def test_dare_drops_with_the_seeded_generator_and_rescales():
    density, seed, w = 0.5, 7, [1.0, 2.0]
    gen = torch.Generator().manual_seed(seed)
    keep_a, keep_b = torch.rand(4, generator=gen) < density, torch.rand(4, generator=gen) < density
    want: dict[int, float] = {}
    for idx, val, keep, wi in ((A_IDX, A_VAL, keep_a, w[0]), (B_IDX, B_VAL, keep_b, w[1])):
        for i, v, k in zip(idx, val, keep.tolist()):
            want[i] = want.get(i, 0.0) + (wi * v / density if k else 0.0)
    want = {i: v for i, v in want.items() if v != 0}
    rng = torch.get_rng_state()
    got = compose_diffs(list(pair()), method="dare", density=density, weights=w, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never drawn from
    assert entries(got) == pytest.approx(want)
    again = compose_diffs(list(pair()), method="dare", density=density, weights=w, seed=seed)
    assert entries(again) == entries(got)
    assert entries(compose_diffs(list(pair()), method="dare", density=1.0)) == entries(compose_diffs(list(pair())))


def test_dare_ties_without_drop_is_ties_without_trim():
    assert entries(compose_diffs(list(pair()), method="dare_ties", density=1.0)) == \
        entries(compose_diffs(list(pair()), method="ties", density=1.0))


def test_dense_parts():
    head_a, head_b = {"classifier.weight": torch.ones(2, 3)}, {"classifier.weight": torch.zeros(2, 3)}
    with pytest.raises(DiffpruneError, match="both replace 'classifier.weight'.*--head-from"):
        compose_diffs(list(pair(head_a, head_b)))
    out = compose_diffs(list(pair(head_a, head_b)), head_from=1, method="ties", density=0.5)
    assert torch.equal(out.dense["classifier.weight"], torch.zeros(2, 3))
    same = compose_diffs(list(pair(head_a, {"classifier.weight": torch.ones(2, 3)})))  # equal: no conflict
    assert torch.equal(same.dense["classifier.weight"], torch.ones(2, 3))
    a, b = pair(dense_b={"t": torch.ones(10)})
    b.sparse.pop("t")
    with pytest.raises(DiffpruneError, match="sparse diff in diff 1 but replaced whole"):
        compose_diffs([a, b])
    only_b = compose_diffs(list(pair(None, head_b)))  # the head's diff gives task, labels and method
    assert "classifier.weight" in only_b.dense and only_b.extra["composed"]["method"] == "sum"


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="mean"), "unknown composition method 'mean'"),
    (dict(weights=[1, 2]), "'sum' adds the diffs as they are"),
    (dict(method="linear", weights=[1]), "1 weights for 2 diffs"),
    (dict(method="linear", weights=[1, float("nan")]), "finite"),
    (dict(method="ties"), "needs a density"),
    (dict(method="dare", density=0.0), "needs a density"),
    (dict(method="linear", density=0.5), "keeps every entry"),
    (dict(head_from=5), "head_from must be"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(DiffpruneError, match=match):
        compose_diffs(list(pair()), **kwargs)


def test_refuses_one_diff_and_module_adding_methods():
    a, b = pair()
    with pytest.raises(DiffpruneError, match="at least two"):
        compose_diffs([a])
    b.config["fingerprint_base"] = ["x.weight"]
    b.method = "lora"
    with pytest.raises(DiffpruneError, match="lora diff: it adds modules"):
        compose_diffs([a, b])


def test_fingerprints_refuse_other_bases():
    model, other = make_tiny("bert"), make_tiny("bert", seed=1)
    a, _ = make_diff(model, seed=0)
    b, _ = make_diff(model, seed=1)
    b.dense = a.dense
    a.fingerprint = fingerprint(model, a.fingerprint_names())
    b.fingerprint = fingerprint(other, b.fingerprint_names())
    with pytest.raises(DiffpruneError, match="diff 2 was made on another base model"):
        compose_diffs([a, b], base_model=model)
    b.fingerprint = fingerprint(model, b.fingerprint_names())
    out = compose_diffs([a, b], base_model=model)
    assert out.fingerprint == fingerprint(model, out.fingerprint_names())
    with pytest.raises(DiffpruneError, match="pass base_model="):  # different tensors: needs the base
        compose_diffs([a, b])
    twin = TaskDiff(a.method, a.base_model, a.task, a.label_names, a.config, dict(a.sparse), a.dense,
                    fingerprint=fingerprint(other, a.fingerprint_names()))
    with pytest.raises(DiffpruneError, match="diff 1 and diff 2 were made on different base models"):
        compose_diffs([a, twin])


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture
def two_runs(tmp_path, tiny_model_dir):
    model = make_tiny("bert", vocab_size=VOCAB)
    paths = []
    for seed in (0, 1):
        diff, _ = make_diff(model, seed=seed)
        diff.base_model = str(tiny_model_dir)
        paths.append(save_diff(diff, tmp_path / f"d{seed}", model, value_dtype="float16"))
    return paths


def test_compose_command_writes_a_diff_that_eval_and_merge_take(two_runs, tmp_path):
    from diffprune.api import load_task_model

    a, b = map(str, two_runs)
    out = tmp_path / "c"
    assert main(["compose", a, b, "--method", "ties", "--density", "0.5", "--head-from", b,
                 "--output", str(out)]) == 0
    composed = load_diff(out)
    assert composed.value_dtype == "float16" and composed.extra["composed"]["head_from"] == b
    assert torch.equal(composed.dense["classifier.weight"], load_diff(b).dense["classifier.weight"])
    load_task_model(out)  # the fingerprint of the result checks out on the base model
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0


def _refused(capsys, argv, out):
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (loading a base model may log above it)
    assert last.startswith("diffprune: error: ")
    assert not out.exists()
    return last


def test_compose_command_refuses_bad_input_and_writes_nothing(two_runs, tmp_path, capsys):
    a, b = map(str, two_runs)
    out = tmp_path / "c"
    assert "--head-from" in _refused(capsys, ["compose", a, b, "--output", str(out)], out)
    _refused(capsys, ["compose", a, b, "--weights", "1,2", "--head-from", a, "--output", str(out)], out)
    _refused(capsys, ["compose", a, b, "--method", "ties", "--head-from", a, "--output", str(out)], out)
    _refused(capsys, ["compose", a, b, "--head-from", "elsewhere", "--output", str(out)], out)
    _refused(capsys, ["compose", a, b, "--method", "linear", "--weights", "1,x", "--output", str(out)], out)
    _refused(capsys, ["compose", a, b, "--method", "median", "--output", str(out)], out)
    _refused(capsys, ["compose", a, str(tmp_path / "nope"), "--output", str(out)], out)
    meta = json.loads((two_runs[1] / CONFIG_FILE).read_text())
    meta["fingerprint"] = "0" * 64  # as if made on another base model
    (two_runs[1] / CONFIG_FILE).write_text(json.dumps(meta))
    assert "another base model" in _refused(capsys, ["compose", a, b, "--head-from", a, "--output", str(out)], out)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    assert main(["compose", a, b, "--head-from", a, "--output", str(foreign)]) == 2
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    assert main(["compose", a, b, "--head-from", a, "--output", a]) == 2


def test_convert_command(two_runs, tmp_path, capsys):
    a = two_runs[0]
    assert main(["convert", str(a), "--dtype", "int8", "--output", str(tmp_path / "q")]) == 0
    assert "bytes per nonzero" in capsys.readouterr().out
    q = load_diff(tmp_path / "q")
    assert q.value_dtype == "int8" and json.loads((tmp_path / "q" / CONFIG_FILE).read_text())["coding"]["values"]["lossy"]
    assert main(["convert", str(a), "--dtype", "float32", "--output", str(a)]) == 0  # in place
    assert load_diff(a).value_dtype == "float32"
    assert main(["convert", str(a), "--dtype", "float32", "--format-version", "1", "--output",
                 str(tmp_path / "v1")]) == 0
    assert json.loads((tmp_path / "v1" / CONFIG_FILE).read_text())["format_version"] == 1
    out = tmp_path / "x"
    _refused(capsys, ["convert", str(a), "--dtype", "fp8", "--output", str(out)], out)
    _refused(capsys, ["convert", str(a), "--dtype", "int8", "--format-version", "1", "--output", str(out)], out)
    (tmp_path / "file").write_text("x")
    _refused(capsys, ["convert", str(a), "--dtype", "int8", "--output", str(tmp_path / "file" / "y")],
             tmp_path / "file" / "y")
