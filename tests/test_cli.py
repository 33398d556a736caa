"""The `diffprune` command line end to end on a tiny BERT with a real tokenizer (seconds, no network)."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import make_tiny, crash_at_step
from diffprune.cli import main
from diffprune.tasks import write_demo_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"))


def train_args(model_dir, data_dir, out, *extra):
    return ["train", "--model", str(model_dir), "--task", "toy", "--train-file", str(data_dir / "train.tsv"),
            "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence", "--output-dir", str(out),
            "--max-train-samples", "48", "--max-eval-samples", "40", "--batch-size", "16", "--max-length", "16",
            "--epochs", "1", "--l0-epochs", "1", "--no-progress", "--logging-steps", "1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data_dir):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(train_args(tiny_model_dir, data_dir, out, "--structured", "--sparsity", "0.01")) == 0
    return out


def test_train_writes_diff_metrics_and_log(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"l0", "fixed_mask"}
    assert "accuracy" in metrics["final"]["dev"]
    st = metrics["storage"]
    assert st["nnz"] == round(0.01 * st["num_diff_params"])
    assert st["value_dtype"] == "float16" and st["sparse_bytes_per_nnz"] < 8.0  # compact format, half values
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    l0 = [r for r in records if r["phase"] == "l0" and "expected_l0_frac" in r]
    assert l0 and all(0 < r["expected_l0_frac"] <= 1 for r in l0) and "task_loss" in l0[0]
    assert (trained / "diff" / "diff.safetensors").exists() and not (trained / "phases" / "l0" / "checkpoints").exists()


def test_inspect_json(trained, capsys):
    assert main(["inspect", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert info["nnz"] == metrics["storage"]["nnz"] and info["method"] == "diff-pruning"
    assert sum(info["nnz_by_layer"].values()) == info["nnz"]
    assert main(["inspect", str(trained)]) == 0
    assert "nonzeros per layer" in capsys.readouterr().out


def test_eval_reproduces_final_metrics(trained, data_dir, capsys):
    assert main(["eval", str(trained), "--task", "toy", "--train-file", str(data_dir / "train.tsv"),
                 "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence",
                 "--max-eval-samples", "40"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = json.loads((trained / "metrics.json").read_text())["final"]
    assert got["dev"]["accuracy"] == pytest.approx(want["dev"]["accuracy"])
    assert got["dev"]["loss"] == pytest.approx(want["dev"]["loss"], rel=1e-4)


def test_diff_dtype_flag_stores_int8_and_final_metrics_are_those_of_the_stored_diff(tmp_path, tiny_model_dir,
                                                                                     data_dir, capsys):
    out = tmp_path / "q"
    assert main(train_args(tiny_model_dir, data_dir, out, "--sparsity", "0.05", "--diff-dtype", "int8")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["storage"]["value_dtype"] == "int8" and "final_float32" in metrics
    assert json.loads((out / "diff" / "diff_config.json").read_text())["coding"]["values"]["lossy"] is True
    assert json.loads((out / "phases" / "fixed_mask" / "snapshot" / "diff_config.json").read_text())[
        "coding"]["values"]["dtype"] == "float32"  # snapshots (what --resume restores) stay exact
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "toy", "--train-file", str(data_dir / "train.tsv"),
                 "--dev-file", str(data_dir / "dev.tsv"), "--text-columns", "sentence",
                 "--max-eval-samples", "40"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dev"]["loss"] == pytest.approx(metrics["final"]["dev"]["loss"], rel=1e-5)
    assert main(train_args(tiny_model_dir, data_dir, tmp_path / "bad", "--diff-dtype", "fp8")) == 2
    assert not (tmp_path / "bad").exists()


def test_merge_loads_with_plain_transformers(trained, tmp_path, capsys):
    from diffprune.api import load_task_model

    assert main(["merge", str(trained), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    applied, tokenizer, _ = load_task_model(trained)
    batch = tokenizer(["the film was great", "not bad at all"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, applied(**batch).logits, atol=1e-5)
    assert merged.config.id2label == {0: "0", 1: "1"}


def test_resume_after_crash_mid_phase(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    out = tmp_path / "out"
    # step 6 is in the fixed-mask phase (3 steps per phase), after a checkpoint at step 2
    with crash_at_step(monkeypatch, 6):
        main(train_args(tiny_model_dir, data_dir, out, "--save-steps", "2"))
    assert (out / "phases" / "l0" / "snapshot").exists() and not (out / "diff").exists()
    assert (out / "phases" / "fixed_mask" / "checkpoints" / "checkpoint-2").exists()
    # without --resume the directory is refused, with it the run completes
    assert main(train_args(tiny_model_dir, data_dir, out, "--save-steps", "2")) == 2
    assert main(train_args(tiny_model_dir, data_dir, out, "--save-steps", "2", "--resume")) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    fixed = [r["step"] for r in steps if r["phase"] == "fixed_mask" and "loss" in r]
    assert fixed[-1] == 3 and (out / "diff" / "diff_config.json").exists()


def run_error(argv, capsys):
    capsys.readouterr()  # drop what earlier steps printed
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffprune:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("diffprune: error:"), lines
    err = lines[0]
    return err


def test_user_errors_are_one_line(tmp_path, tiny_model_dir, data_dir, capsys, trained):
    assert "did you mean 'rte'" in run_error(["train", "--task", "rtee", "--data-dir", str(tmp_path),
                                              "--output-dir", str(tmp_path / "o")], capsys)
    assert "method" in run_error(train_args(tiny_model_dir, data_dir, tmp_path / "o1", "--method", "bitfitt"), capsys)
    assert "sparsity" in run_error(train_args(tiny_model_dir, data_dir, tmp_path / "o2", "--sparsity", "0"), capsys)
    assert "sparsity" in run_error(train_args(tiny_model_dir, data_dir, tmp_path / "o3", "--sparsity", "1.5"), capsys)
    assert "not found" in run_error(["train", "--task", "rte", "--data-dir", str(tmp_path / "nope"),
                                     "--output-dir", str(tmp_path / "o4")], capsys)
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    # a corrupt diff file
    bad = tmp_path / "bad"
    shutil.copytree(trained / "diff", bad)
    data = (bad / "diff.safetensors").read_bytes()
    (bad / "diff.safetensors").write_bytes(data[: len(data) // 2])
    run_error(["inspect", str(bad)], capsys)
    # a diff applied to another base model
    other = tmp_path / "other-base"
    make_tiny("bert", vocab_size=30522, seed=5).save_pretrained(other)
    shutil.copytree(tiny_model_dir, other, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    assert "fingerprint" in run_error(["merge", str(trained), "--output", str(tmp_path / "m"),
                                       "--base-model", str(other)], capsys)
    assert not (tmp_path / "m").exists()


def test_summary_of_a_dense_method(capsys):
    from diffprune.cli import print_summary

    print_summary("out", {"main_metric": "accuracy", "final": {"dev": {"accuracy": 0.5}},
                          "storage": {"nnz": 0, "num_diff_params": 0, "sparsity": None,
                                      "dense_params": 10, "stored_bytes": 40}})
    assert "10 dense parameters, 40 bytes" in capsys.readouterr().out


def test_inspect_dense_method_reports_params_per_task(tmp_path, tiny_model_dir, data_dir, capsys):
    """A method without a sparse diff (BitFit): stored parameters as a share of the base, no sparsity line."""
    from transformers import AutoModelForSequenceClassification as Auto

    out = tmp_path / "bitfit"
    args = train_args(tiny_model_dir, data_dir, out, "--method", "bitfit")
    i = args.index("--l0-epochs")  # not an option of BitFit (that would be a clear error)
    assert main(args[:i] + args[i + 2:]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    base = Auto.from_pretrained(tiny_model_dir, num_labels=2)
    head = {"classifier.weight", "classifier.bias"}
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and n not in head)
    head_n = sum(p.numel() for n, p in base.named_parameters() if n in head)
    pretrained = sum(p.numel() for n, p in base.named_parameters() if n not in head)
    assert info["nnz"] == 0 and info["sparsity"] is None
    assert info["task_params"] == biases + head_n and info["base_params"] == pretrained
    assert info["task_params_pct"] == pytest.approx(100 * (biases + head_n) / pretrained)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters stored per task" in text and "sparsity" not in text


def test_l0_phase_uses_kept_gradient_buffers_and_trains_the_same(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """Under the Trainer every L0 step writes into the kept buffers, and the result is bit for bit that of
    autograd's own gradients (the same run with the buffers refused)."""
    from safetensors.torch import load_file

    from diffprune.core.l0_step import KeptGrads

    real = KeptGrads.grad_targets
    hits = []

    def counted(self, w, log_alpha):
        got = real(self, w, log_alpha)
        hits.append(got is not None)
        return got

    monkeypatch.setattr(KeptGrads, "grad_targets", counted)
    assert main(train_args(tiny_model_dir, data_dir, tmp_path / "kept", "--structured", "--seed", "3")) == 0
    assert hits == [True] * 3  # 48 examples / batch 16: three L0 steps, each backward into the buffers
    monkeypatch.setattr(KeptGrads, "grad_targets", lambda self, w, log_alpha: None)
    assert main(train_args(tiny_model_dir, data_dir, tmp_path / "plain", "--structured", "--seed", "3")) == 0
    kept = load_file(str(tmp_path / "kept" / "diff" / "diff.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "diff" / "diff.safetensors"))
    assert kept.keys() == plain.keys() and all(torch.equal(kept[k], plain[k]) for k in kept)


@pytest.mark.parametrize("hold", [["--set", "alpha_hold=0.5", "--l0-lambda", "1e-3", "--set", "alpha_lr=0.1"],  # paper
                                  ["--set", "target_hold=0.5", "--set", "target_reach=0.9",  # target, learned
                                   "--set", "gate_choice=learned", "--set", "alpha_lr=0.1"],
                                  ["--set", "target_hold=0.5", "--set", "target_reach=0.9"]])  # target, |w|
def test_a_hold_freezes_the_gates_for_the_first_share_of_the_l0_phase(tmp_path, tiny_model_dir, data_dir,
                                                                     monkeypatch, hold):
    """With a hold of 0.5 of a 6-step L0 phase, α stays at α₀ through the first 3 optimizer steps while w
    trains, and moves from the 4th on; without the hold it moves at the first step."""
    from diffprune.core.l0_step import KeptGrads

    real = KeptGrads.grad_targets
    seen = []  # (w, log_alpha) as each L0 backward finds them, i.e. after the previous optimizer step

    def record(self, w, log_alpha):
        seen.append((w.detach().clone(), log_alpha.detach().clone()))
        return real(self, w, log_alpha)

    monkeypatch.setattr(KeptGrads, "grad_targets", record)
    assert main(train_args(tiny_model_dir, data_dir, tmp_path / "hold", "--l0-epochs", "2", "--seed", "3",
                           *hold)) == 0
    assert len(seen) == 6
    alphas = [a for _, a in seen]
    assert all(torch.equal(alphas[0], a) for a in alphas[1:4])
    assert not torch.equal(alphas[3], alphas[4])
    assert not torch.equal(seen[0][0], seen[1][0])  # w trains during the hold
    seen.clear()
    assert main(train_args(tiny_model_dir, data_dir, tmp_path / "free", "--l0-epochs", "2", "--seed", "3",
                           "--set", "target_hold=0")) == 0
    assert not torch.equal(seen[0][1], seen[1][1])


def test_a_kept_l0_state_is_reused_by_a_run_at_another_sparsity(tmp_path, tiny_model_dir, data_dir):
    src = tmp_path / "src"
    assert main(train_args(tiny_model_dir, data_dir, src, "--sparsity", "0.02", "--set", "keep_l0_state=true")) == 0
    assert (src / "phases" / "l0" / "l0_state.safetensors").is_file()
    follow = tmp_path / "follow"
    assert main(train_args(tiny_model_dir, data_dir, follow, "--sparsity", "0.005",
                           "--set", f"from_l0={json.dumps(str(src))}")) == 0
    metrics = json.loads((follow / "metrics.json").read_text())
    assert list(metrics["phases"]) == ["fixed_mask"]
    stats = metrics["storage"]
    assert stats["nnz"] == round(0.005 * stats["num_diff_params"])


def test_the_target_mode_steers_the_gates_after_each_step_and_records_the_density(tmp_path, tiny_model_dir,
                                                                                  data_dir):
    """Learned gates on a 12-step L0 phase: the shift starts after the hold (3 steps), the logged target
    follows the schedule, and metrics.json keeps the nonzero share before the projection."""
    from diffprune.core.density_control import DensitySchedule

    out = tmp_path / "t"
    assert main(train_args(tiny_model_dir, data_dir, out, "--l0-epochs", "4", "--sparsity", "0.05",
                           "--set", "gate_choice=learned")) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    l0 = [r for r in records if r["phase"] == "l0" and "density_target" in r]
    schedule = DensitySchedule(0.05)
    assert len(l0) >= 10
    for r in l0:  # logged after step r["step"], whose progress was (step - 1) / 12
        assert r["density_target"] == pytest.approx(schedule((r["step"] - 1) / 12), abs=1e-6)
        assert (r["gate_shift"] == 0.0) == ((r["step"] - 1) / 12 < 0.25)
    train = json.loads((out / "metrics.json").read_text())["phases"]["l0"]["train"]
    assert 0.0 <= train["nonzero_frac"] <= 1.0 and "expected_l0_frac" in train


def test_the_default_magnitude_gates_put_the_density_on_the_schedule(tmp_path, tiny_model_dir, data_dir):
    """Default mode, 12 L0 steps: after each step past the hold the density is the schedule's, to one
    entry, and the L0 phase ends with at most t·d nonzeros, so the projection has nothing left to cut."""
    from diffprune.core.density_control import DensitySchedule

    out = tmp_path / "m"
    assert main(train_args(tiny_model_dir, data_dir, out, "--l0-epochs", "4", "--sparsity", "0.05")) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    l0 = [r for r in records if r["phase"] == "l0" and "density_target" in r]
    schedule = DensitySchedule(0.05)
    d = json.loads((out / "metrics.json").read_text())["storage"]["num_diff_params"]
    assert len(l0) >= 10
    for r in l0:
        progress = (r["step"] - 1) / 12
        if progress >= 0.25:
            assert r["expected_l0_frac"] == pytest.approx(round(schedule(progress) * d) / d, abs=1.5 / d)
    train = json.loads((out / "metrics.json").read_text())["phases"]["l0"]["train"]
    assert 0.0 < train["nonzero_frac"] <= round(0.05 * d) / d + 1e-12


def test_a_crash_in_evaluation_loses_no_training(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """Each phase is saved before it is evaluated: when evaluation fails, --resume evaluates again
    without retraining, and the run ends with the same diff as one that never failed."""
    import diffprune.train.pipeline as pipeline

    plain = tmp_path / "plain"
    assert main(train_args(tiny_model_dir, data_dir, plain, "--sparsity", "0.02")) == 0
    real, calls = pipeline.evaluate, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the fixed-mask phase's evaluation
            raise RuntimeError("evaluation failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", fail_once)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        main(train_args(tiny_model_dir, data_dir, out, "--sparsity", "0.02"))
    assert (out / "phases" / "fixed_mask" / "snapshot").is_dir() and not (out / "metrics.json").exists()
    steps = len((out / "log.jsonl").read_text().splitlines())
    assert main(train_args(tiny_model_dir, data_dir, out, "--sparsity", "0.02", "--resume")) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == steps  # nothing trained again
    a = (plain / "diff" / "diff.safetensors").read_bytes()
    assert a == (out / "diff" / "diff.safetensors").read_bytes()


def test_an_old_diff_without_a_fingerprint_loads_with_a_warning(tmp_path, tiny_model_dir, data_dir, caplog):
    """Diffs saved before "fingerprinted" was recorded: a null fingerprint cannot be told from an edited
    one, so it loads (old files stay usable) but says that the base check is off."""
    import logging

    from diffprune.storage import load_diff

    out = tmp_path / "old"
    assert main(train_args(tiny_model_dir, data_dir, out, "--sparsity", "0.02")) == 0
    config = out / "diff" / "diff_config.json"
    meta = json.loads(config.read_text())
    meta["fingerprint"] = None
    del meta["fingerprinted"]
    config.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="diffprune"):
        load_diff(out / "diff")
    assert any("no base-model fingerprint" in r.getMessage() for r in caplog.records)
