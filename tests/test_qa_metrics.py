"""SQuAD v1.1's EM and F1 against cases worked out by hand (official normalisation, several gold answers)."""
import pytest

from diffprune.errors import DiffpruneError
from diffprune.tasks.qa_metrics import exact_match, normalize_answer, squad_scores, token_f1


@pytest.mark.parametrize("text,want", [
    ("The Eiffel Tower!", "eiffel tower"),          # lower case, article, punctuation
    ("  an   apple ", "apple"),                      # article and whitespace
    ("A theater, a banana", "theater banana"),       # articles only as whole words
    ("U.S. Army's", "us armys"),                     # punctuation inside words goes, the letters stay
    ("the-the", "thethe"),                           # punctuation first, so no article is left here
    ("Über façade", "über façade"),                  # non-ASCII letters are kept
])
def test_normalisation(text, want):
    assert normalize_answer(text) == want


def test_exact_match_after_normalisation():
    assert exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0


@pytest.mark.parametrize("pred,gold,want", [
    ("the big red dog", "red dog barked", 2 / 3),   # common {red, dog}: P = 2/3, R = 2/3
    ("dog dog", "dog", 2 / 3),                       # a bag: one common dog, P = 1/2, R = 1
    ("red", "big red dog", 0.5),                     # P = 1, R = 1/3 -> 2·(1/3)/(4/3)
    ("cat", "dog", 0.0),
    ("the", "a", 0.0),                               # both normalise to nothing: no common token
])
def test_token_f1(pred, gold, want):
    assert token_f1(pred, gold) == pytest.approx(want)


def test_dataset_scores_take_the_best_gold_and_average_over_questions():
    golds = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["Santa Clara, California", "Levi's Stadium"],
             "q3": ["1966"]}
    preds = {"q1": "Broncos", "q2": "Santa Clara", "q3": "1966"}
    # q1: EM 1 (matches "the Broncos"); q2: F1 vs "santa clara california" = 2·1·(2/3)/(5/3) = 0.8, EM 0; q3: 1
    got = squad_scores(preds, golds)
    assert got["exact_match"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx((1 + 0.8 + 1) / 3)


def test_a_missing_prediction_scores_zero_and_empty_sets_are_refused():
    assert squad_scores({}, {"q": ["x"]}) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(DiffpruneError):
        squad_scores({}, {})
