"""Issue 14, what no table row can show: locks between processes, overwriting a real run, permissions,
cleanup after kills, huge inputs, incomplete checkpoints, kill-and-resume, a NaN loss mid-training."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from diffprune.cli import main
from run_inputs import data_dir, src_path, train_args, trained  # noqa: F401  (fixtures)


def test_lock_names_the_other_process_and_dies_with_it(tmp_path, tiny_model_dir, data_dir, capsys):
    """A second process on the same --output-dir exits 2 at once naming the first; a killed holder frees it."""
    from diffprune.train.rundir import RunLock

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from diffprune.train.rundir import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": src_path()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        assert main(train_args(tiny_model_dir, data_dir, out)) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert time.perf_counter() - start < 30 and not (out / "run_config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out)
    lock.acquire()  # the kernel dropped the killed holder's lock
    lock.release()


def test_overwrite_replaces_a_run_and_keeps_nothing_else_of_it(tmp_path, trained, tiny_model_dir, data_dir):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "phases" / "stale.txt").write_text("from the old run")
    assert main(train_args(tiny_model_dir, data_dir, run, "--overwrite")) == 0
    assert not (run / "phases" / "stale.txt").exists() and (run / "diff" / "diff.safetensors").exists()
    # the merged output is marked, so a second merge may replace it
    assert main(["merge", str(run), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "diffprune_merged.json").is_file()
    assert main(["merge", str(run), "--output", str(tmp_path / "m")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in (tmp_path / "m").iterdir())


def test_output_files_get_normal_permissions(trained):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("run_config.json", "metrics.json", "log.jsonl", "diff/diff.safetensors", "diff/diff_config.json"):
        assert (trained / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_eval_on_another_task_warns(trained, tmp_path, data_dir, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained), "--task", "other", "--train-file", str(data_dir / "train.tsv"),
                 "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence",
                 "--max-eval-samples", "4"]) == 0
    assert "diffprune: warning:" in capsys.readouterr().err


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    from diffprune.train.rundir import clean_leftovers

    phase = tmp_path / "phases" / "l0"
    (phase / ".snapshot.tmp-0123abcd").mkdir(parents=True)
    (tmp_path / ".diff.tmp").mkdir()
    (tmp_path / ".metrics.json.x1y2.tmp").write_text("{")
    (phase / ".snapshot.old-89abcdef").mkdir()  # renamed aside, its replacement never arrived
    (phase / ".snapshot.old-89abcdef" / "diff_config.json").write_text("{}")
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phases"]
    assert sorted(p.name for p in phase.iterdir()) == ["snapshot"]


def test_a_huge_line_is_cut_before_tokenizing(minilm_tokenizer):
    import datasets

    from diffprune.train.data import tokenize

    ds = datasets.Dataset.from_dict({"text_a": ["word " * 2_000_000], "label": [1]})  # 10 MB, one line
    start = time.perf_counter()
    out = tokenize(ds, minilm_tokenizer, 16, regression=False)
    assert len(out[0]["input_ids"]) == 16 and time.perf_counter() - start < 20


def test_incomplete_checkpoints_are_skipped_and_removed(tmp_path):
    from diffprune.train.rundir import newest_complete_checkpoint

    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        ck = folder / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text("{}")
        safetensors.torch.save_file({"x": torch.zeros(1)}, str(ck / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({}, ck / name)
    (folder / "checkpoint-4" / "trainer_state.json").unlink()  # killed while writing checkpoint-4
    assert newest_complete_checkpoint(folder) == str(folder / "checkpoint-2")
    assert not (folder / "checkpoint-4").exists()


def _kill_args(model_dir, data_dir, out, *extra):
    return train_args(model_dir, data_dir, out, "--max-train-samples", "64", "--batch-size", "8", "--save-steps", "2",
                      "--l0-epochs", "5", "--epochs", "5", "--logging-steps", "20", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(_kill_args(tiny_model_dir, data_dir, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["l0", "fixed_mask"])
def test_kill_during_a_checkpoint_write_then_resume_gives_the_same_diff(phase, tmp_path, tiny_model_dir, data_dir,
                                                                        uninterrupted):
    """SIGKILL a training process in `phase`, leave its newest checkpoint half-written, resume: same diff."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": src_path(), "OMP_NUM_THREADS": "1", "DIFFPRUNE_COMPILE": "0"}
    child = subprocess.Popen([sys.executable, "-m", "diffprune", *_kill_args(tiny_model_dir, data_dir, out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "phases" / phase / "checkpoints"
    deadline = time.time() + 300
    def saved():  # the steps of the complete checkpoints so far
        return [int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/trainer_state.json")]

    while not any(step >= 6 for step in saved()) and child.poll() is None:  # kill a few checkpoints in
        assert time.time() < deadline
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "diff").exists()
    # the kill hit the next checkpoint's write: its folder is there, its optimizer state half-written and
    # trainer_state.json (written last) missing
    done = sorted((p for p in checkpoints.iterdir() if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))
    newest = done[-1]
    partial = checkpoints / f"checkpoint-{int(newest.name.split('-')[1]) + 2}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(newest, partial)
    (partial / "trainer_state.json").unlink()
    data = (partial / "optimizer.pt").read_bytes()
    (partial / "optimizer.pt").write_bytes(data[: len(data) // 3])
    assert main(_kill_args(tiny_model_dir, data_dir, out, "--resume")) == 0
    assert not partial.exists()
    assert (out / "diff" / "diff.safetensors").read_bytes() == \
        (uninterrupted / "diff" / "diff.safetensors").read_bytes()
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, uninterrupted))
    assert got["storage"] == want["storage"] and got["final"]["dev"]["accuracy"] == want["final"]["dev"]["accuracy"]
    print(f"\nkill in {phase} after {newest.name}: nnz {got['storage']['nnz']}, dev accuracy "
          f"{got['final']['dev']['accuracy']:.4f} (uninterrupted {want['final']['dev']['accuracy']:.4f}), "
          "diff.safetensors byte-identical")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, data_dir, capsys,
                                                                      monkeypatch):
    from diffprune.train import pipeline

    original, calls = pipeline.PhaseTrainer.compute_loss, {"n": 0}

    class NanLoss:  # the model, whose loss turns NaN (as after a diverging step)
        training = True

        def __init__(self, model):
            self.model = model

        def __call__(self, **inputs):
            outputs = self.model(**inputs)
            outputs.loss = outputs.loss * float("nan")
            return outputs

    def compute_loss(self, model, inputs, *a, **k):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 6:
                model = NanLoss(model)
        return original(self, model, inputs, *a, **k)

    out = tmp_path / "out"
    args = _kill_args(tiny_model_dir, data_dir, out, "--l0-epochs", "1", "--epochs", "1")
    monkeypatch.setattr(pipeline.PhaseTrainer, "compute_loss", compute_loss)
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffprune:")]
    assert len(err) == 1 and "loss became nan at step 6 of phase 'l0'" in err[0] and "checkpoint-4" in err[0], err
    assert (out / "phases" / "l0" / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (out / "diff").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(pipeline.PhaseTrainer, "compute_loss", original)
    assert main([*args, "--resume"]) == 0 and (out / "diff" / "diff.safetensors").is_file()
