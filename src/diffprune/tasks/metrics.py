"""Task metrics: the GLUE scores (MCC, F1, accuracy, Spearman, Pearson) computed from raw model outputs.

`compute_metrics(spec, predictions, labels)` turns logits into the numbers a task is judged by. Scores are
plain floats on their natural scale ([0, 1] for accuracy and F1, [-1, 1] for correlations), not x100.
Every metric here is higher-is-better (`METRICS[name].higher_is_better`), so "best" is always `max`.

Conventions (GLUE's, via scikit-learn / scipy):
  - predictions may be any model output the Trainer gathers: a tuple or list (a seq2seq classifier such as
    BART or T5 returns (logits, encoder hidden state)), a dict / ModelOutput with "logits", or the logits
    alone; the logits are the first element (transformers puts them first in every output);
  - classification predictions are logits (N, C) and are argmaxed; 1-D integer arrays are taken as class
    indices already;
  - "f1" is binary F1 with class index 1 as the positive class (MRPC, QQP);
  - "macro_f1" is the unweighted mean of per-class F1 (custom tasks);
  - a correlation of constant predictions or labels is undefined (scipy gives nan); we report 0.0 instead,
    matching scikit-learn's MCC convention, because model selection compares numbers and nan never wins
    or loses a comparison.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


@dataclass(frozen=True)
class Metric:
    """A named score over (predicted, gold) arrays; `regression` says whether it takes floats."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    regression: bool
    higher_is_better: bool = True


def _corr(fn, pred: np.ndarray, gold: np.ndarray) -> float:
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return 0.0  # undefined correlation, see the module docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(pred, gold)[0])
    return 0.0 if np.isnan(value) else value


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("accuracy", lambda p, g: float(accuracy_score(g, p)), regression=False),
    Metric("mcc", lambda p, g: float(matthews_corrcoef(g, p)), regression=False),
    Metric("f1", lambda p, g: float(f1_score(g, p, pos_label=1, average="binary", zero_division=0)),
           regression=False),
    Metric("macro_f1", lambda p, g: float(f1_score(g, p, average="macro", zero_division=0)), regression=False),
    Metric("spearman", lambda p, g: _corr(stats.spearmanr, p, g), regression=True),
    Metric("pearson", lambda p, g: _corr(stats.pearsonr, p, g), regression=True),
]}


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def logits_of(predictions):
    """The logits in a model output: itself, its "logits" entry, or the first array of a tuple / list."""
    if hasattr(predictions, "keys") and "logits" in predictions.keys():
        return predictions["logits"]
    if isinstance(predictions, (tuple, list)) and predictions and getattr(predictions[0], "ndim", 0) >= 1:
        return predictions[0]  # (logits, encoder hidden state, ...); a plain list of labels stays as it is
    return predictions


def predictions_to_labels(spec, predictions) -> np.ndarray:
    """Class indices (classification) or float scores (regression) from raw model outputs."""
    pred = _to_numpy(logits_of(predictions))
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.ndim != 1:
            raise ValueError(f"regression predictions must have shape (N,) or (N, 1), got {pred.shape}")
        return pred.astype(np.float64)
    if pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise ValueError(f"task '{spec.name}' has {spec.num_labels} classes but the logits have shape "
                             f"{pred.shape}")
        return pred.argmax(axis=1)
    if pred.ndim == 1 and np.issubdtype(pred.dtype, np.integer):
        return pred
    raise ValueError(f"classification predictions must be logits (N, C) or class indices (N,), got "
                     f"shape {pred.shape} dtype {pred.dtype}")


def compute_metrics(spec, predictions, labels) -> dict[str, float]:
    """Every metric of `spec` plus "main" (the value of `spec.main_metric`, which names it).

    Example for MRPC: {"f1": 0.88, "accuracy": 0.83, "main": 0.88}.
    """
    pred = predictions_to_labels(spec, predictions)
    gold = _to_numpy(labels)
    if gold.ndim == 2 and gold.shape[1] == 1:
        gold = gold[:, 0]
    if gold.shape != pred.shape:
        raise ValueError(f"{len(pred)} predictions but {len(gold)} labels (shapes {pred.shape} vs {gold.shape})")
    if len(gold) == 0:
        raise ValueError("cannot score an empty set of predictions")
    gold = gold.astype(np.float64) if spec.is_regression else gold.astype(np.int64)
    out = {name: METRICS[name].fn(pred, gold) for name in spec.metrics}
    out["main"] = out[spec.main_metric]
    return out


__all__ = ["Metric", "METRICS", "compute_metrics", "logits_of", "predictions_to_labels"]
