"""Metrics against values computed by hand (formulas written out here, not taken from the library)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffprune.tasks import METRICS, TaskSpec, compute_metrics, get_task

# gold / predicted classes giving TP=3, FN=1, FP=1, TN=2
GOLD = np.array([1, 1, 1, 1, 0, 0, 0])
PRED = np.array([1, 1, 1, 0, 1, 0, 0])


def logits_for(pred, num_classes=2):
    """Logits whose argmax is `pred` (with distracting non-uniform values)."""
    out = np.random.default_rng(0).normal(size=(len(pred), num_classes)).astype(np.float32)
    out[np.arange(len(pred)), pred] = out.max() + 1.0
    return out


def test_mcc_matches_the_confusion_matrix_formula():
    tp, tn, fp, fn = 3, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 5/12
    out = compute_metrics(get_task("cola"), logits_for(PRED), GOLD)
    assert out == {"mcc": pytest.approx(expected), "main": pytest.approx(expected)}
    assert expected == pytest.approx(5 / 12)


def test_f1_binary_positive_class_one_and_accuracy():
    out = compute_metrics(get_task("mrpc"), logits_for(PRED), GOLD)
    assert out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["main"] == out["f1"] and get_task("mrpc").main_metric == "f1"
    assert all(type(v) is float for v in out.values())


def test_accuracy_three_classes_and_class_indices_accepted():
    gold = np.array([0, 1, 2, 2, 1])
    pred = np.array([0, 1, 1, 2, 0])
    spec = get_task("mnli")
    assert compute_metrics(spec, logits_for(pred, 3), gold) == {"accuracy": 0.6, "main": 0.6}
    assert compute_metrics(spec, pred, gold)["accuracy"] == 0.6


def test_macro_f1_by_hand():
    spec = TaskSpec("three", ("t",), "y", ("a", "b", "c"), ("accuracy", "macro_f1"), "accuracy", "")
    gold = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/4, class 1: 4/5, class 2: 2/3
    out = compute_metrics(spec, logits_for(pred, 3), gold)
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)


def test_spearman_and_pearson_by_hand():
    spec = get_task("stsb")
    pred = np.array([0.1, 0.5, 0.9, 2.0, 7.0])  # ranks 1 2 3 4 5
    gold = np.array([1.0, 0.2, 3.0, 2.5, 4.0])  # ranks 2 1 4 3 5 -> sum d^2 = 4
    out = compute_metrics(spec, pred[:, None], gold)  # (N, 1) regression output
    assert out["spearman"] == pytest.approx(1 - 6 * 4 / (5 * (25 - 1)))  # 0.8
    assert out["main"] == out["spearman"]
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])  # cov 1, variances 2 and 2
    assert compute_metrics(spec, x, y)["pearson"] == pytest.approx(0.5)


def test_constant_predictions_give_zero_not_nan():
    out = compute_metrics(get_task("stsb"), np.full(4, 2.0), np.array([1.0, 2.0, 3.0, 4.0]))
    assert out == {"spearman": 0.0, "pearson": 0.0, "main": 0.0}
    assert compute_metrics(get_task("cola"), logits_for(np.ones(4, int)), np.array([0, 1, 0, 1]))["mcc"] == 0.0


def test_shape_mistakes_are_caught():
    with pytest.raises(ValueError, match="4 predictions but 3 labels"):
        compute_metrics(get_task("rte"), logits_for(np.zeros(4, int)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="2 classes but the logits have shape"):
        compute_metrics(get_task("rte"), np.zeros((3, 3)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="regression predictions"):
        compute_metrics(get_task("stsb"), np.zeros((3, 2)), np.zeros(3))


def test_every_metric_is_higher_is_better():
    assert set(METRICS) >= {"accuracy", "mcc", "f1", "macro_f1", "spearman", "pearson"}
    assert all(m.higher_is_better for m in METRICS.values())


def test_torch_tensors_are_accepted():
    import torch

    logits = torch.tensor(logits_for(PRED)).to(torch.bfloat16)
    out = compute_metrics(get_task("cola"), logits, torch.tensor(GOLD))
    assert out["mcc"] == pytest.approx(5 / 12)


# ------------------------------------------------------------------------------------------ any model output

def test_tuple_predictions_use_the_logits():
    """A seq2seq classifier's eval predictions are (logits, encoder hidden state): the logits are scored."""
    logits = logits_for(PRED)
    hidden = np.zeros((len(PRED), 5, 8), dtype=np.float32)  # what made np.asarray fail: a ragged tuple
    want = compute_metrics(get_task("mrpc"), logits, GOLD)
    assert compute_metrics(get_task("mrpc"), (logits, hidden), GOLD) == want
    assert compute_metrics(get_task("mrpc"), [logits, hidden, hidden[:, :2]], GOLD) == want
    assert compute_metrics(get_task("mrpc"), {"logits": logits}, GOLD) == want


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_evaluate_an_encoder_decoder(family, minilm_tokenizer, tmp_path):
    """The pipeline's evaluation of a tiny BART / T5 classifier gives the accuracy of its own logits."""
    import torch
    from conftest import VOCAB, make_tiny

    from diffprune.tasks import demo_task, load_task_data, write_demo_data
    from diffprune.train.data import tokenize
    from diffprune.train.pipeline import TrainConfig, evaluate

    spec = demo_task(write_demo_data(tmp_path / "data", n_train=8, n_dev=12))
    model = make_tiny(family, vocab_size=VOCAB)
    model.config.eos_token_id = minilm_tokenizer.sep_token_id  # the classifier reads the final [SEP]
    model.config.pad_token_id = minilm_tokenizer.pad_token_id
    data = load_task_data(spec, None, max_train_samples=1, max_eval_samples=12, seed=0)
    evals = {k: tokenize(v, minilm_tokenizer, 16, spec.is_regression) for k, v in data.evals.items()}
    got = evaluate(model, evals, spec, TrainConfig(output_dir=str(tmp_path / "run"), progress=False),
                   minilm_tokenizer, tmp_path / "run")
    split, dataset = next(iter(evals.items()))
    correct = 0
    with torch.no_grad():
        for row in dataset:
            ids = torch.as_tensor(row["input_ids"]).view(1, -1)
            logits = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            correct += int(logits.argmax(-1).item() == int(row["labels"]))
    assert got[split]["accuracy"] == pytest.approx(correct / len(dataset))
