"""Question answering as the field does it: windows over long contexts in, best answer span out.

Preprocessing (`encode_windows`): question first, context second, `truncation="only_second"`, so a long
context is cut into windows of at most `max_length` tokens that overlap by `doc_stride` tokens (an answer
cut by one window's edge lies whole in the next). The fast tokenizer's offset mapping maps the (first)
answer's character span to token positions; a window that does not hold the whole answer points both
positions at its CLS token (the first token where the tokenizer has no CLS), which is how BERT's SQuAD
recipe teaches "not in this window". `doc_stride=0` means no windows: a context that does not fit is then
an error naming the question, not a silent cut.

Postprocessing (`best_answers`): per question, over all its windows, the span with the largest
start + end logit among the `n_best` largest start and end logits of each window, with end ≥ start, at
most `max_answer_length` tokens, and both ends on context tokens; its text is cut from the context by the
offsets (so the answer keeps the context's own spelling and spacing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffprune.errors import DiffpruneError

N_BEST = 20
MAX_ANSWER_LENGTH = 30


@dataclass
class Windows:
    """Tokenized windows of a set of questions.

    `inputs`: input_ids, attention_mask (and token_type_ids) per window; `example`: the question each
    window belongs to; `offsets`: per window an (L, 2) int array of character offsets into the context,
    (-1, -1) for tokens outside the context; `start_positions` / `end_positions`: the first answer's
    token span per window (the CLS position where the window does not hold it).
    """

    inputs: dict[str, list]
    example: list[int]
    offsets: list[np.ndarray]
    start_positions: list[int]
    end_positions: list[int]

    def __len__(self) -> int:
        return len(self.example)


def check_room(tokenizer, ids: list[str], questions: list[str], max_length: int, doc_stride: int) -> None:
    """Every question must leave more than `doc_stride` tokens of context per window (the tokenizer would
    fail with a message about truncation otherwise)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    worst = int(np.argmax(lengths)) if lengths else 0
    room = max_length - specials - (lengths[worst] if lengths else 0)
    if lengths and room <= doc_stride:
        raise DiffpruneError(
            f"question {ids[worst]} takes {lengths[worst]} tokens, which leaves {max(room, 0)} context tokens per "
            f"window at --max-length {max_length}; a window must hold more than --doc-stride {doc_stride}: raise "
            "--max-length or lower --doc-stride")


def _span(offsets: np.ndarray, c0: int, c1: int, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token positions of the first and last context token of [start_char, end_char), if all inside."""
    if offsets[c0, 0] > start_char or offsets[c1, 1] < end_char:
        return None
    ctx = offsets[c0:c1 + 1]
    start = c0 + int(np.searchsorted(ctx[:, 0], start_char, side="right")) - 1  # last token starting at or before
    end = c0 + int(np.searchsorted(ctx[:, 1], end_char, side="left"))           # first token ending at or after
    return start, end


def encode_windows(tokenizer, ids, questions, contexts, answer_texts, answer_starts, max_length: int,
                   doc_stride: int) -> Windows:
    """Windows and answer positions of a batch of questions (see the module docstring)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DiffpruneError("question answering needs a fast tokenizer (it maps answers through the offset "
                             "mapping); this model's tokenizer is a slow one")
    questions = [q.lstrip() for q in questions]  # leading spaces only waste window room
    check_room(tokenizer, ids, questions, max_length, doc_stride)
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    sample = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    if doc_stride == 0:
        seen = set()
        for i in sample:
            if i in seen:
                raise DiffpruneError(f"the context of question {ids[i]} does not fit in --max-length {max_length} "
                                     "tokens with its question, and --doc-stride 0 means no windows; give a "
                                     "--doc-stride (e.g. 128) or a larger --max-length")
            seen.add(i)
    cls_id = tokenizer.cls_token_id
    out = Windows({k: list(v) for k, v in enc.items()}, list(sample), [], [], [])
    for w, ex in enumerate(sample):
        seq = enc.sequence_ids(w)
        offsets = np.asarray(offsets_all[w], dtype=np.int64).reshape(-1, 2)
        in_ctx = np.array([s == 1 for s in seq])
        offsets[~in_ctx] = -1
        out.offsets.append(offsets)
        row = enc["input_ids"][w]
        cls = row.index(cls_id) if cls_id is not None and cls_id in row else 0
        pos = None
        if answer_texts is not None and answer_texts[ex] and in_ctx.any():
            c = np.flatnonzero(in_ctx)
            start_char = answer_starts[ex][0]
            pos = _span(offsets, int(c[0]), int(c[-1]), start_char, start_char + len(answer_texts[ex][0]))
        out.start_positions.append(pos[0] if pos else cls)
        out.end_positions.append(pos[1] if pos else cls)
    return out


def best_spans(start_logits, end_logits, windows: Windows, n_examples: int, n_best: int = N_BEST,
               max_answer_length: int = MAX_ANSWER_LENGTH) -> list[tuple[float, int, int, int] | None]:
    """Per question, the best span over all its windows as (start + end logit, window, start token, end
    token), or None when no window has a valid span (see the module docstring). Logit rows may be longer
    than their window (batch padding): only the window's own positions are looked at."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if len(start_logits) != len(windows) or len(end_logits) != len(windows):
        raise ValueError(f"{len(start_logits)} rows of logits for {len(windows)} windows")
    best: list[tuple[float, int, int, int] | None] = [None] * n_examples
    for w, ex in enumerate(windows.example):
        off = windows.offsets[w]
        n = len(off)
        s_log, e_log = start_logits[w, :n], end_logits[w, :n]
        ctx = off[:, 0] >= 0
        starts = [i for i in np.argsort(-s_log, kind="stable")[:n_best] if ctx[i]]
        ends = [j for j in np.argsort(-e_log, kind="stable")[:n_best] if ctx[j]]
        for i in starts:
            for j in ends:
                if j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(s_log[i] + e_log[j])
                if best[ex] is None or score > best[ex][0]:
                    best[ex] = (score, w, int(i), int(j))
    return best


def span_chars(windows: Windows, span: tuple[float, int, int, int]) -> tuple[int, int]:
    """The [start, end) character offsets into the context of a span of `best_spans`."""
    _, w, i, j = span
    off = windows.offsets[w]
    return int(off[i, 0]), int(off[j, 1])


def best_answers(start_logits, end_logits, windows: Windows, contexts: list[str], n_best: int = N_BEST,
                 max_answer_length: int = MAX_ANSWER_LENGTH) -> list[str]:
    """The predicted answer text of every question, cut from its context by the offsets ("" when a question
    has no valid span in any window)."""
    answers = []
    for context, span in zip(contexts, best_spans(start_logits, end_logits, windows, len(contexts), n_best,
                                                  max_answer_length)):
        if span is None:
            answers.append("")
        else:
            a, b = span_chars(windows, span)
            answers.append(context[a:b])
    return answers


__all__ = ["Windows", "check_room", "encode_windows", "best_spans", "span_chars", "best_answers", "N_BEST",
           "MAX_ANSWER_LENGTH"]
