"""SQuAD v1.1's official metrics: exact match and token F1 after answer normalisation.

This is the arithmetic of the official `evaluate-v1.1.py`, so numbers here are the ones papers report
(divided by 100: diffprune stores every score as a fraction in [0, 1], like accuracy and F1 of the GLUE
tasks in `metrics.py`). Normalisation: lower case, remove punctuation (`string.punctuation`), remove the
articles a / an / the as whole words, collapse whitespace. Per question, the best score over its gold
answers counts; the dataset score is the mean over questions.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Mapping, Sequence

from diffprune.errors import DiffpruneError

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
QA_METRICS = ("exact_match", "f1")


def normalize_answer(text: str) -> str:
    """The official normalisation, in the official order (lower, punctuation, articles, whitespace)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of precision and recall of the normalised tokens (a bag: repeats count)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} as fractions, averaged over the questions of `golds`.

    A question of `golds` with no prediction scores 0 (as the official script does, which also warns);
    every question needs at least one gold answer.
    """
    if not golds:
        raise DiffpruneError("cannot score an empty set of questions")
    em = f1 = 0.0
    for qid, answers in golds.items():
        if not answers:
            raise DiffpruneError(f"question {qid} has no gold answer to score against")
        pred = predictions.get(qid, "")
        em += max(exact_match(pred, a) for a in answers)
        f1 += max(token_f1(pred, a) for a in answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}


__all__ = ["QA_METRICS", "normalize_answer", "exact_match", "token_f1", "squad_scores"]
