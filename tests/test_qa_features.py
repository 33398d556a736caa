"""QA windows and answer positions (MiniLM's fast tokenizer), and best-span decoding over windows.

Positions are checked against the tokenizer's own ids of the answer text (not against the offsets the code
uses), and decoding against spans planted in hand-made logits.
"""
import numpy as np
import pytest

from diffprune.errors import DiffpruneError
from diffprune.tasks.qa_features import Windows, best_answers, encode_windows

FILLER = "the weather was calm that day and nothing much happened in town ."
ANSWER = "the old stone bridge over the river"


def encode(tok, context, answer, max_length=32, stride=8, question="what did they cross?"):
    start = context.index(answer)
    return encode_windows(tok, ["q1"], [question], [context], [[answer]], [[start]], max_length, stride)


def answer_ids(tok, answer):
    return tok(answer, add_special_tokens=False)["input_ids"]


def test_long_context_answer_in_second_window(minilm_tokenizer):
    tok = minilm_tokenizer
    context = f"{FILLER} {FILLER} they crossed {ANSWER} at dawn ."
    w = encode(tok, context, ANSWER, max_length=32, stride=8)
    assert len(w) >= 2 and set(w.example) == {0}
    assert all(len(ids) <= 32 for ids in w.inputs["input_ids"])
    # the first window does not hold the answer: both positions at CLS (index 0, the [CLS] token)
    assert (w.start_positions[0], w.end_positions[0]) == (0, 0)
    assert w.inputs["input_ids"][0][0] == tok.cls_token_id
    holding = [i for i in range(len(w)) if w.start_positions[i] != 0]
    assert holding and holding[0] >= 1
    for i in holding:
        ids = w.inputs["input_ids"][i]
        assert ids[w.start_positions[i]:w.end_positions[i] + 1] == answer_ids(tok, ANSWER)
    # question first, context second: the question's tokens follow CLS in every window
    q = answer_ids(tok, "what did they cross?")
    assert all(ids[1:1 + len(q)] == q for ids in w.inputs["input_ids"])


def test_answer_cut_by_a_window_edge_is_labelled_in_the_next_window(minilm_tokenizer):
    tok = minilm_tokenizer
    want = answer_ids(tok, ANSWER)
    found = None
    for n in range(0, 40):  # shift the answer until some window's edge cuts it
        context = " ".join(["calm"] * n) + f" they crossed {ANSWER} at dawn . " + FILLER
        a = context.index(ANSWER)
        w = encode(tok, context, ANSWER, max_length=24, stride=8)
        for i in range(len(w) - 1):
            last = w.offsets[i][w.offsets[i][:, 0] >= 0][-1]  # the window's last context token (char span)
            if a < last[1] < a + len(ANSWER):                 # it ends inside the answer
                found = (w, i)
                break
        if found:
            break
    assert found, "no window edge cut the answer"
    w, i = found
    assert (w.start_positions[i], w.end_positions[i]) == (0, 0)  # cut: not in this window
    nxt = w.inputs["input_ids"][i + 1]
    assert nxt[w.start_positions[i + 1]:w.end_positions[i + 1] + 1] == want
    # and decoding finds the answer through the next window
    n = max(len(ids) for ids in w.inputs["input_ids"])
    start, end = np.full((len(w), n), -5.0), np.full((len(w), n), -5.0)
    start[i + 1, w.start_positions[i + 1]] = 3.0
    end[i + 1, w.end_positions[i + 1]] = 3.0
    assert best_answers(start, end, w, [context]) == [ANSWER]


def test_no_stride_refuses_a_context_that_does_not_fit(minilm_tokenizer):
    context = f"{FILLER} {FILLER} they crossed {ANSWER} at dawn ."
    with pytest.raises(DiffpruneError, match=r"question q1.*--doc-stride 0"):
        encode(minilm_tokenizer, context, ANSWER, max_length=32, stride=0)
    short = f"they crossed {ANSWER} ."
    w = encode(minilm_tokenizer, short, ANSWER, max_length=32, stride=0)
    assert len(w) == 1


def test_a_question_that_leaves_no_room_is_refused(minilm_tokenizer):
    with pytest.raises(DiffpruneError, match=r"question q1 takes .* tokens.*--doc-stride 8"):
        encode(minilm_tokenizer, FILLER, "calm", max_length=32, stride=8, question=" ".join(["why"] * 25))


def _windows():
    # two windows of one question over the context "aa bb cc dd"; tokens 0-1 are CLS and question, 2-5 context
    ctx = [(-1, -1), (-1, -1), (0, 2), (3, 5), (6, 8), (9, 11)]
    win2 = [(-1, -1), (-1, -1), (6, 8), (9, 11)]
    return Windows({}, [0, 0], [np.array(ctx), np.array(win2)], [0, 0], [0, 0])


def _brute_force(start, end, w, contexts, max_len):
    """The best valid span of every question by trying every pair (no n-best shortcut)."""
    best = {}
    for k, ex in enumerate(w.example):
        off = w.offsets[k]
        for i in range(len(off)):
            for j in range(i, min(len(off), i + max_len)):
                if off[i, 0] < 0 or off[j, 0] < 0:
                    continue
                score = start[k, i] + end[k, j]
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, contexts[ex][off[i, 0]:off[j, 1]])
    return [best[e][1] if e in best else "" for e in range(len(contexts))]


def test_best_span_rules():
    w = _windows()
    context = ["aa bb cc dd"]
    start = np.full((2, 6), -10.0)
    end = np.full((2, 6), -10.0)
    start[0, 1], end[0, 1] = 50, 50       # question token: never an answer, however high
    start[0, 2], end[0, 3] = 5, 5         # "aa bb": score 10
    start[1, 2], end[1, 3] = 6, 6         # "cc dd" in the second window: score 12, wins across windows
    assert best_answers(start, end, w, context) == ["cc dd"]
    end[0, 2], start[0, 5] = 60, 60       # "dd" … "aa" would end before it starts: "aa" alone wins (65)
    assert best_answers(start, end, w, context) == ["aa"]
    # rows longer than their window (batch padding) are cut to the window
    pad = dict(pad_width=((0, 0), (0, 3)), constant_values=100)
    assert best_answers(np.pad(start, **pad), np.pad(end, **pad), w, context) == ["aa"]


@pytest.mark.parametrize("max_len", [1, 2, 30])
def test_best_span_matches_brute_force_on_random_logits(max_len):
    w = _windows()
    rng = np.random.default_rng(max_len)
    for _ in range(50):
        start, end = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
        got = best_answers(start, end, w, ["aa bb cc dd"], max_answer_length=max_len)
        assert got == _brute_force(start, end, w, ["aa bb cc dd"], max_len)
