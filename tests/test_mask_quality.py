"""benchmarks/mask_quality.py: its fixed-mask-only method trains exactly the source diff's positions from δ = 0,
and its random masks have the requested size, leave the word embeddings out and follow their seed."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from diffprune.cli import main
from diffprune.methods.base import METHODS, get_method
from diffprune.sparse_model import layout_for, select_parameters
from diffprune.storage.format import load_diff
from tests.conftest import make_tiny
from tests.run_inputs import data_dir, trained  # noqa: F401  (fixtures)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "mask_quality.py"


@pytest.fixture(scope="module")
def mq():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_mask_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.register_method()
    yield module
    METHODS.pop(module.METHOD, None)
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPT.parent))


def positions(diff):
    return {name: set(sd.indices.tolist()) for name, sd in diff.sparse.items()}


def test_mask_alone_trains_the_source_positions_from_zero(mq, tmp_path, tiny_model_dir, data_dir,  # noqa: F811
                                                          trained):  # noqa: F811
    source = load_diff(trained / "diff")
    out = tmp_path / "alone"
    args = ["train", "--model", str(tiny_model_dir), "--task", "toy", "--train-file", str(data_dir / "train.tsv"),
            "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence", "--output-dir", str(out),
            "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16", "--max-length", "16",
            "--no-progress", "--method", mq.METHOD, "--set", "epochs=1", "--set", "sparsity=0.005",
            "--set", f"mask_from=\"{trained / 'diff'}\""]
    assert main(args) == 0
    alone = load_diff(out / "diff")
    assert positions(alone) == positions(source)  # every position of the source's mask, and no other
    assert any(bool((sd.values != 0).any()) for sd in alone.sparse.values())  # it trained
    # and it started from δ = 0, not from the source's values
    cls = get_method(mq.METHOD)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    method = cls(cls.config_class.from_dict({"mask_from": str(trained / "diff")}), model,
                 ["classifier.weight", "classifier.bias"])
    start = method.delta_model.source
    assert start.values.numel() == sum(len(v) for v in positions(source).values())
    assert not bool(start.values.any())


def test_random_mask_size_seed_and_no_word_embeddings(mq):
    model = make_tiny("bert", vocab_size=128)
    word = "bert.embeddings.word_embeddings.weight"
    assert mq.input_embedding_names(model) == {word}
    layout = layout_for(model, select_parameters(model, ["classifier.weight", "classifier.bias"]))
    a = mq.random_mask(layout, 0.02, 0, {word})
    assert a.numel() == round(0.02 * layout.total)
    assert bool((a[1:] > a[:-1]).all())
    i = layout.names.index(word)
    lo, hi = layout.offsets[i], layout.offsets[i] + layout.numels[i]
    assert not bool(((a >= lo) & (a < hi)).any())
    assert torch.equal(a, mq.random_mask(layout, 0.02, 0, {word}))
    assert not torch.equal(a, mq.random_mask(layout, 0.02, 1, {word}))
    assert bool(((mq.random_mask(layout, 0.5, 0, set()) >= lo) & (mq.random_mask(layout, 0.5, 0, set()) < hi)).any())


def fake_run(path, task, seed, method_options, with_diff):
    import json

    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"phases": {}, "final": {"dev": {"main": 0.5}}}))
    (path / "run_config.json").write_text(json.dumps({"task": task, "seed": seed, "method_options": method_options}))
    if with_diff:
        (path / "diff").mkdir()
        (path / "diff" / "diff.safetensors").write_bytes(b"")


def test_plan_takes_the_masks_of_sparse_runs_and_adds_random_ones_per_task_seed_sparsity(mq, tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "full", "rte", 43, {}, with_diff=False)
    fake_run(runs / "dp@0.005", "rte", 43, {"sparsity": 0.005}, with_diff=True)
    fake_run(runs / "nadp@0.005", "rte", 43, {"sparsity": 0.005}, with_diff=True)
    fake_run(runs / "dp@0.01", "rte", 43, {"sparsity": 0.01}, with_diff=True)
    cells = mq.plan([str(runs)], tmp_path / "out", n_random=2)
    assert [(c.label, c.sparsity, c.source == "random") for c in cells] == [
        ("dp@0.005", 0.005, False), ("nadp@0.005", 0.005, False), ("random0@0.005", 0.005, True),
        ("random1@0.005", 0.005, True), ("dp@0.01", 0.01, False), ("random0@0.01", 0.01, True),
        ("random1@0.01", 0.01, True)]
    assert cells[0].source == str((runs / "dp@0.005" / "diff").resolve()) and cells[0].own_score == 0.5
    only = mq.plan([str(runs)], tmp_path / "out", n_random=1, sparsity=0.01)
    assert [c.label for c in only] == ["dp@0.01", "random0@0.01"]
    assert {c.mask_seed for c in cells if c.source == "random"} == {0, 1}
    fake_run(tmp_path / "s42" / "dp@0.005", "rte", 42, {"sparsity": 0.005}, with_diff=True)  # the same setting
    both = mq.plan([str(runs), str(tmp_path / "s42")], tmp_path / "out", n_random=0, sparsity=0.005)
    assert sorted((c.seed, c.label) for c in both) == [(42, "dp@0.005"), (43, "dp@0.005"), (43, "nadp@0.005")]
    assert len({c.run_dir for c in both}) == 3
