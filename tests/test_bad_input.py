"""Issue 14: every failure a new user hits gives one `diffprune: error:` line, exit 2, and destroys nothing.

`CASES` is the table: each row builds its input (files, folders, a held lock) under tmp_path, names the
command, the words the error line must hold, the paths that must not exist afterwards and the paths that
must still exist with the same bytes. Almost every row fails before training starts, so the table is fast.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffprune.cli import main
from run_inputs import data_dir, train_args, trained  # noqa: F401  (fixtures)


class Evil:  # pickled into a checkpoint file: weights_only=True loading must refuse it
    pass


class Ctx:
    def __init__(self, tmp: Path, model: Path, data: Path, trained: Path):
        self.tmp, self.model, self.data, self.trained = tmp, model, data, trained
        self.cleanup = []

    def train(self, out, *extra, **files):
        return train_args(self.model, self.data, out, *extra, **files)

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def copy_model(self, name="model") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.model, dst)
        return dst

    def copy_run(self, name="run") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.trained, dst)
        return dst

    def data_file(self, name: str, rows: list[str], header="sentence\tlabel") -> Path:
        return self.write(f"data/{name}", "\n".join([header, *rows]) + "\n")


def _rows(n=20, label=lambda i: str(i % 2)):
    return [f"the film number {i} was {'good' if i % 2 else 'bad'}\t{label(i)}" for i in range(n)]


def regression_args(c: Ctx, out, train_rows, *extra):
    c.data_file("reg_train.tsv", train_rows)
    c.data_file("reg_dev.tsv", _rows(8, lambda i: f"{i / 8:.2f}"))
    return ["train", "--model", str(c.model), "--task", "reg", "--train-file", str(c.tmp / "data/reg_train.tsv"),
            "--dev-file", str(c.tmp / "data/reg_dev.tsv"), "--text-columns", "sentence", "--regression",
            "--output-dir", str(out), "--batch-size", "8", "--max-length", "16", "--epochs", "1",
            "--no-progress", "--method", "bitfit", *extra]


# ----------------------------------------------------------------------------------------------- setups
# Each returns (argv, paths that must not exist afterwards, paths that must keep their bytes).

def overwrite_non_run(c):
    d = c.tmp / "D"
    c.write("D/thesis.txt", "three years of work")
    return c.train(d, "--overwrite"), [d / "run_config.json"], [d / "thesis.txt"]


def merge_into_user_folder(c):
    c.write("M/config.json", "{}")
    c.write("M/notes.txt", "mine")
    return ["merge", str(c.trained), "--output", str(c.tmp / "M")], [c.tmp / "M/model.safetensors"], \
        [c.tmp / "M/config.json", c.tmp / "M/notes.txt"]


def merge_over_base(c):
    base = c.copy_model("base")
    return ["merge", str(c.trained), "--base-model", str(base), "--output", str(base)], [], \
        [base / "model.safetensors", base / "config.json"]


def lock_held(c):
    out = c.tmp / "locked"
    out.mkdir()
    fd = os.open(out / ".diffprune.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242\n", 0)
    c.cleanup.append(lambda: os.close(fd))
    return c.train(out), [out / "run_config.json", out / "log.jsonl"], []


def flag(*extra):
    def setup(c):
        out = c.tmp / "o"
        return c.train(out, *extra), [out], []
    return setup


def label_file(label):
    def setup(c):
        out = c.tmp / "o"
        rows = _rows(6, lambda i: f"{i / 6:.2f}")
        rows[1] = rows[1].rsplit("\t", 1)[0] + f"\t{label}"
        return regression_args(c, out, rows), [out], [c.tmp / "data/reg_train.tsv"]
    return setup


def nan_loss(c):
    out = c.tmp / "o"  # finite float32 labels whose squared error overflows: the loss is inf at step 1
    return regression_args(c, out, _rows(8, lambda i: "1e30")), [out / "diff", out / "metrics.json"], []


def non_utf8(c):
    path = c.data_file("bad.tsv", _rows(4))
    data = path.read_bytes().split(b"\n")
    data[2] = data[2].replace(b"film", b"fi\xfflm")
    path.write_bytes(b"\n".join(data))
    return train_args(c.model, c.tmp / "data", c.tmp / "o", train="bad.tsv", dev="bad.tsv"), [c.tmp / "o"], [path]


def csv_columns(c):
    c.write("data/bad.csv", "sentence,label\nthe film was good,1\nthe film, it was bad,0\n")
    return train_args(c.model, c.tmp / "data", c.tmp / "o", train="bad.csv", dev="bad.csv"), [c.tmp / "o"], []


def jsonl_line(c):
    c.write("data/bad.jsonl", '{"sentence": "one\u2028two", "label": 1}\n{"sentence": "x", "label": 0}\n'
                              '{"sentence": "broken", "label": }\n')
    return train_args(c.model, c.tmp / "data", c.tmp / "o", train="bad.jsonl", dev="bad.jsonl"), [c.tmp / "o"], []


def model_folder(damage):
    def setup(c):
        m = c.copy_model()
        damage(m)
        return c.train(c.tmp / "o", "--model", str(m)), [c.tmp / "o"], []
    return setup


def _truncate(m):
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickled(m):
    state = safetensors.torch.load_file(str(m / "model.safetensors"))
    torch.save(state, m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()


def output_is_file(c):
    f = c.write("taken", "a file")
    return c.train(f), [], [f]


def importance_output_file(c):
    f = c.write("taken", "a file")
    return ["importance", "--model", str(c.model), "--task", "toy", "--train-file", str(c.data / "train.tsv"),
            "--dev-file", str(c.data / "dev.tsv"), "--text-columns", "sentence", "--output", str(f),
            "--num-examples", "4"], [], [f]


def eval_on_regression(c):
    c.data_file("reg.tsv", _rows(6, lambda i: f"{i / 6:.2f}"))
    reg = str(c.tmp / "data/reg.tsv")
    return ["eval", str(c.trained), "--task", "reg", "--train-file", reg, "--dev-file", reg, "--text-columns",
            "sentence", "--regression"], [], []


def _edited_diff(c, edit):
    run = c.copy_run()
    cfg_path = run / "diff" / "diff_config.json"
    meta = json.loads(cfg_path.read_text())
    edit(run / "diff", meta)
    cfg_path.write_text(json.dumps(meta))
    return run


def regression_diff_on_classification(c):
    run = _edited_diff(c, lambda d, meta: meta.update(label_names=None))
    return ["eval", str(run), "--task", "toy", "--train-file", str(c.data / "train.tsv"), "--dev-file",
            str(c.data / "dev.tsv"), "--text-columns", "sentence", "--max-eval-samples", "4"], [], []


def fingerprint_null(c):
    run = _edited_diff(c, lambda d, meta: meta.update(fingerprint=None))
    return ["merge", str(run), "--output", str(c.tmp / "m")], [c.tmp / "m"], []


def nan_in_diff(c):
    def edit(d, meta):
        import hashlib
        import zlib

        import numpy as np
        tensors = safetensors.torch.load_file(str(d / "diff.safetensors"))
        assert meta["coding"]["values"]["dtype"] == "float16"  # (byte planes: low bytes, then high bytes)
        raw = bytearray(zlib.decompress(tensors["sparse.values"].numpy().tobytes()))
        raw[0], raw[meta["coding"]["values"]["count"]] = 0x00, 0x7E  # value 0 := float16 NaN (0x7E00)
        tensors["sparse.values"] = torch.from_numpy(np.frombuffer(zlib.compress(bytes(raw)), dtype=np.uint8).copy())
        safetensors.torch.save_file(tensors, str(d / "diff.safetensors"), metadata={"format": "diffprune-task-diff"})
        meta["tensor_file_sha256"] = hashlib.sha256((d / "diff.safetensors").read_bytes()).hexdigest()
    run = _edited_diff(c, edit)
    return ["merge", str(run), "--output", str(c.tmp / "m")], [c.tmp / "m"], []


def _crashed_run(c, damage):
    """A copy of the finished run turned back into one stopped in its fixed-mask phase at checkpoint-2."""
    run = c.copy_run()
    for p in ("diff", "metrics.json", "phases/fixed_mask"):
        shutil.rmtree(run / p) if (run / p).is_dir() else (run / p).unlink()
    ck = run / "phases/fixed_mask/checkpoints/checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(ck / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
    torch.save({"last_epoch": 2}, ck / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, ck / "rng_state.pth")
    damage(ck)
    return run


def resume_pickled_optimizer(c):
    run = _crashed_run(c, lambda ck: torch.save(Evil(), ck / "optimizer.pt"))
    return c.train(run, "--resume"), [run / "diff"], [run / "run_config.json"]


def resume_corrupt_rng(c):
    run = _crashed_run(c, lambda ck: (ck / "rng_state.pth").write_bytes(b"PK\x03\x04 not a zip"))
    return c.train(run, "--resume"), [run / "diff"], [run / "run_config.json"]


def include_nothing(c):
    out = c.tmp / "o"
    return c.train(out, "--include", "no.such.parameter*"), [out / "run_config.json", out], []


def resume_changed(*extra):
    def setup(c):
        run = c.copy_run()
        (run / "metrics.json").unlink()
        return c.train(run, "--resume", *extra), [run / "metrics.json"], [run / "run_config.json"]
    return setup


def resume_other_dev_file(c):
    run = c.copy_run()
    (run / "metrics.json").unlink()
    shutil.copy(c.data / "dev.tsv", c.tmp / "dev2.tsv")
    return c.train(run, "--resume", dev=str(c.tmp / "dev2.tsv")), [run / "metrics.json"], [run / "run_config.json"]


def argv(*args):
    return lambda c: (list(args), [], [])


CASES = [
    # 1. --overwrite deletes only a diffprune run
    ("overwrite_non_run", overwrite_non_run, ["not a diffprune run"]),
    # 2. merge replaces only a merged model made by diffprune, never the base model
    ("merge_into_user_folder", merge_into_user_folder, ["not a merged model"]),
    ("merge_over_base", merge_over_base, ["base model"]),
    # 4. the output folder is locked while a run writes there
    ("lock_held", lock_held, ["in use", "pid 4242"]),
    # 5. numbers from the user are finite and in range
    ("lr_nan", flag("--lr", "nan"), ["--lr", "finite"]),
    ("epochs_nan", flag("--epochs", "nan"), ["--epochs", "finite"]),
    ("l0_epochs_inf", flag("--l0-epochs", "inf"), ["--l0-epochs", "finite"]),
    ("warmup_nan", flag("--warmup", "nan"), ["--warmup", "finite"]),
    ("set_nan", flag("--set", "alpha_init=NaN"), ["alpha_init", "finite"]),
    ("label_nan", label_file("nan"), ["reg_train.tsv:3", "finite"]),
    ("label_inf", label_file("inf"), ["reg_train.tsv:3", "finite"]),
    ("label_float32_overflow", label_file("1e39"), ["reg_train.tsv:3", "finite"]),
    ("nan_loss", nan_loss, ["loss became inf", "stopped"]),
    # 6. one line instead of a traceback
    ("non_utf8", non_utf8, ["bad.tsv:3", "UTF-8"]),
    ("set_wrong_type_float", flag("--set", "sparsity=abc"), ["sparsity", "finite number", "'abc'"]),
    ("set_wrong_type_hold", flag("--set", "alpha_hold=half"), ["alpha_hold", "'half'"]),
    ("set_wrong_type_bool", flag("--set", "structured=yes"), ["structured", "true/false"]),
    ("magnitude_gates_with_fixed_lambda", flag("--gate-choice", "magnitude", "--l0-lambda", "1e-7"),
     ["gate_choice=magnitude", "l0_lambda"]),
    ("alpha_lr_with_magnitude_gates", flag("--alpha-lr", "0.1"), ["alpha_lr", "gate_choice=magnitude"]),
    ("max_length_beyond_positions", flag("--max-length", "100"), ["--max-length 100", "64 positions"]),
    ("truncated_safetensors", model_folder(_truncate), ["model.safetensors", "corrupt or truncated"]),
    ("pickled_bin_only", model_folder(_pickled), ["pickled", "pytorch_model.bin"]),
    ("missing_config_json", model_folder(lambda m: (m / "config.json").unlink()), ["no config.json"]),
    ("output_dir_is_file", output_is_file, ["is an existing file"]),
    ("importance_output_is_file", importance_output_file, ["is an existing file"]),
    ("eval_classification_diff_on_regression", eval_on_regression, ["classification diff", "regression"]),
    ("eval_regression_diff_on_classification", regression_diff_on_classification,
     ["regression diff", "classification"]),
    ("resume_pickled_optimizer", resume_pickled_optimizer, ["optimizer.pt", "not a plain tensor file"]),
    ("resume_corrupt_rng_state", resume_corrupt_rng, ["rng_state.pth", "corrupt"]),
    # 7. a clean error leaves nothing behind
    ("include_matches_nothing", include_nothing, ["no parameter matches"]),
    # 8. smaller ones
    ("resume_other_batch_size", resume_changed("--batch-size", "8"), ["batch_size=16", "not 8"]),
    ("resume_other_max_length", resume_changed("--max-length", "12"), ["max_length=16", "not 12"]),
    ("resume_other_warmup", resume_changed("--warmup", "0.1"), ["warmup=0.0", "not 0.1"]),
    ("resume_other_lr", resume_changed("--lr", "0.001"), ["lr unset (the method's default)", "not lr=0.001"]),
    ("resume_other_epochs", resume_changed("--epochs", "2"), ["epochs=1.0", "not epochs=2.0"]),
    ("resume_other_data_file", resume_other_dev_file, ["data_files"]),
    ("fingerprint_null", fingerprint_null, ["fingerprint", "null"]),
    ("nan_in_diff", nan_in_diff, ["NaN"]),
    ("argparse_error", argv("train", "--batch-size", "abc", "--output-dir", "x"), ["invalid int value"]),
    ("argparse_missing", argv("merge", "somewhere"), ["--output"]),
    ("csv_not_called_tab_separated", csv_columns, ["bad.csv:3", "comma-separated"]),
    ("jsonl_line_number", jsonl_line, ["bad.jsonl:3", "JSON"]),
]


def _snapshot(paths):
    return {p: p.read_bytes() for p in paths}


@pytest.mark.parametrize("name,setup,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_destroys_nothing(name, setup, words, tmp_path, tiny_model_dir, data_dir,
                                                      trained, capsys):
    c = Ctx(tmp_path, tiny_model_dir, data_dir, trained)
    try:
        args, absent, kept = setup(c)
        before = _snapshot(kept)
        capsys.readouterr()
        code = main(args)
        captured = capsys.readouterr()
    finally:
        for undo in c.cleanup:
            undo()
    lines = [line for line in captured.err.splitlines() if line.startswith("diffprune:")]
    errors = [line for line in lines if line.startswith("diffprune: error:")]
    assert code == 2, (code, captured.err[-2000:])
    assert len(errors) == 1, captured.err[-2000:]
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    for word in words:
        assert word in errors[0], (word, errors[0])
    for path in absent:
        assert not path.exists(), f"{path} was written"
    assert _snapshot(kept) == before
