"""Every method trains on SQuAD-format QA, on a tiny BERT and a tiny GPT-2 (a decoder, right-padded), and
stores a task state that reproduces the run's EM/F1 and loss when reloaded; the span head `qa_outputs` is
found as the task head of every family's `…ForQuestionAnswering` class.
"""
import json

import pytest
import transformers

from conftest import ALL_FAMILIES, FAMILIES, VOCAB, make_tiny
from diffprune.api import load_task_model, train
from diffprune.archs import task_head_names
from diffprune.tasks import get_task, load_task_data, task_kind
from diffprune.train.pipeline import TrainConfig, evaluate
from qa_data import write_squad

RECIPE = dict(max_length=48, doc_stride=16, batch_size=8, max_train_samples=12, max_eval_samples=6,
              progress=False, logging_steps=5)
TWO_PHASE = {"diff-pruning", "non-adaptive-diff-pruning", "lt-sft"}
METHODS = ["full", "last-layer", "bitfit", "adapter-houlsby", "adapter-pfeiffer", "lora", "diff-pruning",
           "diff-pruning-structured", "non-adaptive-diff-pruning", "lt-sft", "prune-lora", "head-pruning"]
GPT2_METHODS = ["full", "bitfit", "lora", "diff-pruning", "adapter-houlsby", "prune-lora"]


@pytest.fixture(scope="module")
def squad(tmp_path_factory):
    return write_squad(tmp_path_factory.mktemp("squad"), n_train=4, n_dev=2, filler=2)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, minilm_tokenizer):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_tiny("gpt2", vocab_size=VOCAB).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    # as GPT-2's own tokenizer: no token types (GPT-2 would embed them with its word embedding)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _options(label):
    method = label.replace("-structured", "")
    opts = {"epochs": 1.0, "lr": 1e-3}
    if label.endswith("-structured"):
        opts["structured"] = True
    if method in TWO_PHASE:
        opts["sparsity"] = 0.05
    if method in {"diff-pruning"}:
        opts["l0_epochs"] = 1.0
    if method in {"prune-lora", "head-pruning"}:
        opts["importance_examples"] = 8
    return method, opts


def _check(run, squad, tmp_path):
    metrics = json.loads((run / "metrics.json").read_text())
    dev = metrics["final"]["dev"]
    assert set(dev) >= {"exact_match", "f1", "main", "loss"} and dev["main"] == dev["f1"]
    assert 0.0 <= dev["exact_match"] <= dev["f1"] <= 1.0
    preds = json.loads((run / "predictions.json").read_text())
    assert len(preds) == RECIPE["max_eval_samples"]
    # the stored diff alone (base model + diff) gives the run's numbers again
    spec = get_task("squad")
    model, tok, diff = load_task_model(run)
    assert task_head_names(model) and all(n.split(".")[0] in ("qa_outputs",) for n in task_head_names(model))
    data = load_task_data(spec, squad, 1, RECIPE["max_eval_samples"], 42)
    evals = {k: task_kind(spec).eval_split(v, tok, spec, 48, 16) for k, v in data.evals.items()}
    got = evaluate(model, evals, spec, TrainConfig(output_dir=str(tmp_path), progress=False), tok, tmp_path)["dev"]
    assert got["f1"] == pytest.approx(dev["f1"]) and got["loss"] == pytest.approx(dev["loss"], rel=1e-4)


@pytest.mark.parametrize("label", METHODS)
def test_every_method_on_qa_bert(label, tiny_model_dir, squad, tmp_path):
    method, opts = _options(label)
    run = tmp_path / "run"
    train(output_dir=str(run), task="squad", model=str(tiny_model_dir), method=method, data_dir=str(squad),
          **RECIPE, **opts)
    _check(run, squad, tmp_path)


@pytest.mark.parametrize("label", GPT2_METHODS)
def test_methods_on_qa_gpt2(label, gpt2_dir, squad, tmp_path):
    method, opts = _options(label)
    run = tmp_path / "run"
    train(output_dir=str(run), task="squad", model=str(gpt2_dir), method=method, data_dir=str(squad),
          **RECIPE, **opts)
    _check(run, squad, tmp_path)


QA_HEAD = {"modernbert": {"head", "classifier"}}  # ModernBERT's QA class: a prediction head, then the span layer


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_qa_outputs_is_the_task_head_of_every_family(family):
    model = make_tiny(family)
    qa = transformers.AutoModelForQuestionAnswering.from_config(model.config)
    heads = {n.split(".")[0] for n in task_head_names(qa)}
    assert heads == QA_HEAD.get(family, {"qa_outputs"})
    assert "qa_outputs" in heads or family in QA_HEAD


@pytest.mark.parametrize("label", ["lora", "diff-pruning"])
def test_merged_decoder_qa_model_reloads_with_plain_transformers(label, gpt2_dir, squad, tmp_path):
    import torch

    from diffprune.cli import main

    method, opts = _options(label)
    run = tmp_path / "run"
    train(output_dir=str(run), task="squad", model=str(gpt2_dir), method=method, data_dir=str(squad),
          **RECIPE, **opts)
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    plain = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    ours, tok, _ = load_task_model(run)
    batch = tok(["where does anna live?"], ["anna lives in rome and works as a baker."], return_tensors="pt")
    assert "token_type_ids" not in batch
    with torch.no_grad():
        a, b = plain(**batch), ours(**batch)
    assert torch.allclose(a.start_logits, b.start_logits, atol=1e-5)
    assert torch.allclose(a.end_logits, b.end_logits, atol=1e-5)
