"""Tiny data, a trained tiny run and the train command shared by the bad-input and run-safety tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from diffprune.cli import main
from diffprune.tasks import write_demo_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"))


def train_args(model_dir, data_dir, out, *extra, train="train.tsv", dev="dev.tsv"):
    return ["train", "--model", str(model_dir), "--task", "toy", "--train-file", str(Path(data_dir) / train),
            "--dev-file", str(Path(data_dir) / dev), "--text-columns", "sentence", "--output-dir", str(out),
            "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16", "--max-length", "16",
            "--epochs", "1", "--l0-epochs", "1", "--no-progress", "--logging-steps", "1", "--structured",
            *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(train_args(tiny_model_dir, data_dir, out)) == 0
    return out


def src_path() -> str:
    """The folder that holds the imported diffprune package (for child processes)."""
    import diffprune

    return str(Path(diffprune.__file__).resolve().parents[1])
