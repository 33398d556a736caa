"""Tiny SQuAD-format files for the QA tests, written by the tests themselves (no shared data).

Each paragraph says where a few named people live and what they do; questions ask for one of them, with the
gold answer(s) at their true character offsets (computed here with str.find, so they are right by
construction). `long_context` pads a paragraph with filler so that it spans several windows.
"""
from __future__ import annotations

import json
from pathlib import Path

NAMES = ["anna", "boris", "clara", "david", "emma", "felix", "greta", "hugo"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "quito", "delhi"]
JOBS = ["painter", "baker", "doctor", "pilot", "farmer", "writer", "singer", "tailor"]


def paragraph(i: int, filler: int = 0) -> dict:
    people = [(NAMES[(i + k) % 8], CITIES[(i * 3 + k) % 8], JOBS[(i * 5 + k) % 8]) for k in range(3)]
    text = " ".join(f"{n} lives in {c} and works as a {j}." for n, c, j in people)
    if filler:
        text = " ".join(["the weather was calm that day."] * filler) + " " + text
    qas = []
    for k, (n, c, j) in enumerate(people):
        sentence = text.find(f"{n} lives in")
        c_at = text.find(c, sentence)
        j_at = text.find(j, sentence)
        qas.append({"id": f"q{i}-{k}c", "question": f"where does {n} live?",
                    "answers": [{"text": c, "answer_start": c_at}, {"text": f"in {c}", "answer_start": c_at - 3}]})
        qas.append({"id": f"q{i}-{k}j", "question": f"what does {n} work as?",
                    "answers": [{"text": j, "answer_start": j_at}]})
    return {"context": text, "qas": qas}


def squad_json(paragraphs: list[dict]) -> dict:
    return {"version": "1.1", "data": [{"title": "people", "paragraphs": paragraphs}]}


def write_squad(folder, n_train: int = 12, n_dev: int = 4, filler: int = 0, names=("train.json", "dev.json")) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(json.dumps(squad_json([paragraph(i, filler) for i in range(n_train)])))
    (folder / names[1]).write_text(json.dumps(squad_json([paragraph(100 + i, filler) for i in range(n_dev)])))
    return folder
