"""`diffprune report` and `diffprune sweep`: the report's numbers against ones computed here from the runs.

Most tests build run directories by hand (real diffs written with `save_diff` on a tiny BERT, metrics.json and
log.jsonl with chosen values), so every expected number is known; one test runs a real tiny sweep end to end
and a second sweep call that must reuse every finished cell.
"""
import json
import shutil

import pytest
import torch

from conftest import make_tiny
from diffprune.cli import main
from diffprune.compare import parse_entries
from diffprune.errors import DiffpruneError
from diffprune.methods import get_method, make_config
from diffprune.report import build_report
from diffprune.storage import SparseDelta, TaskDiff, diff_stats, layer_group, load_diff, save_diff
from diffprune.sweep import grid_labels, parse_sparsities
from diffprune.tasks import write_demo_data

HEAD = ("classifier.weight", "classifier.bias")
# dev main metric (final) per (task, variant, sparsity); the L0 phase ends 3 points lower
SCORES = {("rte", "full", None): 0.70, ("sst2", "full", None): 0.90,
          ("rte", "s", 0.01): 0.695, ("sst2", "s", 0.01): 0.895, ("rte", "s", 0.001): 0.68, ("sst2", "s", 0.001): 0.88,
          ("rte", "u", 0.01): 0.69, ("sst2", "u", 0.01): 0.89, ("rte", "u", 0.001): 0.67, ("sst2", "u", 0.001): 0.87}


def write_run(run_dir, model, task, variant, sparsity, seed=0):
    """A finished run as the pipeline leaves it: diff/, metrics.json, log.jsonl, run_config.json."""
    names = [n for n, _ in model.named_parameters() if n not in HEAD]
    numel = {n: model.get_parameter(n).numel() for n in names}
    head = {n: model.get_parameter(n).detach().clone() for n in HEAD}
    final = SCORES[(task, variant, sparsity)]
    if variant == "full":
        dense = {n: p.detach().clone() for n, p in model.named_parameters()}
        diff = TaskDiff("full", "tiny", task, ["0", "1"], {"epochs": 2.0}, {}, dense,
                        {"base_params": sum(numel.values())})
        phases = {"finetune": {"dev": {"accuracy": final, "main": final}, "train": {"steps": 10, "seconds": 1.0}}}
        method, options = "full", {"epochs": 2.0}
    else:
        # structured keeps every 3rd tensor, unstructured every 2nd; round(t·d) positions drawn among those
        kept = names[::3] if variant == "s" else names[::2]
        total = sum(numel[n] for n in kept)
        g = torch.Generator().manual_seed(seed)
        flat = torch.zeros(total)
        flat[torch.randperm(total, generator=g)[:round(sparsity * sum(numel.values()))]] = 1.0
        sparse, start = {}, 0
        for n in kept:
            part = flat[start:start + numel[n]].view(model.get_parameter(n).shape)
            start += numel[n]
            if part.any():
                sparse[n] = SparseDelta.from_dense(part * 0.01)
        options = {"sparsity": sparsity, "structured": variant == "s", "l0_epochs": 1.0, "epochs": 1.0}
        diff = TaskDiff("diff-pruning", "tiny", task, ["0", "1"], options, sparse, head,
                        {"num_diff_params": sum(numel.values()), "diff_tensors": numel,
                         "base_params": sum(numel.values())})
        phases = {"l0": {"dev": {"accuracy": final - 0.03, "main": final - 0.03}, "train": {"steps": 10}},
                  "fixed_mask": {"dev": {"accuracy": final, "main": final}, "train": {"steps": 10}}}
        method = "diff-pruning"
    save_diff(diff, run_dir / "diff", model)
    stats = diff_stats(load_diff(run_dir / "diff"), run_dir / "diff")
    metrics = {"task": task, "method": method, "model": "tiny", "phases": phases,
               "final": {"dev": phases[list(phases)[-1]]["dev"]}, "main_metric": "accuracy",
               "storage": {k: stats[k] for k in ("nnz", "num_diff_params", "sparsity", "stored_bytes",
                                                 "sparse_bytes_per_nnz", "dense_params", "task_params",
                                                 "task_params_pct")}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "run_config.json").write_text(json.dumps(
        {"task": task, "model": "tiny", "method": method, "method_options": options, "batch_size": 16,
         "max_length": 16, "seed": 42, "max_train_samples": 64, "max_eval_samples": None, "warmup": 0.0,
         "data_dir": "glue"}))
    records = []
    for phase in phases:
        for step in range(1, 11):
            record = {"phase": phase, "step": step, "loss": 1.0 / step, "task_loss": 0.5 / step}
            if phase == "l0":
                record["expected_l0_frac"] = 1.0 / step
            records.append(record)
    records.append(records[-1])  # a resumed run logs a step twice
    records.append({"phase": list(phases)[-1], "step": 10, "train_runtime": 3.0})  # the summary, no loss
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


LABEL = {"full": "full", "s": "diff-pruning-structured", "u": "diff-pruning"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Two tasks × (full, structured and unstructured at 0.1% and 1%), laid out as a sweep output."""
    root = tmp_path_factory.mktemp("sweep")
    model = make_tiny("bert")
    for seed, (task, variant, sparsity) in enumerate(SCORES):
        label = LABEL[variant] + ("" if sparsity is None else f"@{sparsity:g}")
        run_dir = root / task / "runs" / label
        run_dir.mkdir(parents=True)
        write_run(run_dir, model, task, variant, sparsity, seed)
    (root / "rte" / "runs" / "lt-sft@0.01").mkdir()  # started, never finished
    (root / "rte" / "runs" / "lt-sft@0.01" / "run_config.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def report(grid, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report([grid], out), out


def run_dir(grid, task, variant, sparsity):
    return grid / task / "runs" / (LABEL[variant] + ("" if sparsity is None else f"@{sparsity:g}"))


def test_heatmap_is_nnz_by_layer_of_the_chosen_setting(report, grid):
    result, out = report
    h = result["tables"]["heatmap"]
    # structured first; no 0.5% run, both sparsities on two tasks, so the larger one
    assert (h["variant"], h["sparsity"]) == ("diff-pruning-structured", 0.01)
    assert h["tasks"] == ["rte", "sst2"]
    for task, row in zip(h["tasks"], h["matrix"]):
        path = run_dir(grid, task, "s", 0.01) / "diff"
        by_layer = diff_stats(load_diff(path), path)["nnz_by_layer"]
        assert row == [by_layer.get(g, 0) for g in h["groups"]]
        assert sum(row) == load_diff(path).nnz
    model = make_tiny("bert")
    assert set(h["groups"]) == {layer_group(n) for n, _ in model.named_parameters() if n not in HEAD}
    assert (out / "nnz_heatmap.png").stat().st_size > 1000


def test_untouched_share_counts_tensors_without_nonzeros(report, grid):
    result, _ = report
    u = result["tables"]["untouched"]
    expected = {}
    for (task, variant, sparsity) in SCORES:
        if variant == "full":
            continue
        diff = load_diff(run_dir(grid, task, variant, sparsity) / "diff")
        listed = diff.extra["diff_tensors"]
        untouched = sum(1 for n in listed if n not in diff.sparse or diff.sparse[n].nnz == 0)
        expected[(task, LABEL[variant], sparsity)] = (untouched, len(listed))
    got = {(r["task"], r["variant"], r["sparsity"]): (r["untouched"], r["groups"]) for r in u["rows"]}
    assert got == expected
    for variant in ("diff-pruning", "diff-pruning-structured"):
        pooled = u["pooled"][variant]
        mine = [v for k, v in expected.items() if k[1] == variant]
        assert pooled["share"] == pytest.approx(sum(a for a, _ in mine) / sum(b for _, b in mine))
        assert sum(k[0] for k in pooled["by_kind"].values()) == pooled["untouched"]
        assert sum(k[1] for k in pooled["by_kind"].values()) == pooled["groups"]


def test_sparsity_curve_fixed_mask_and_storage_equal_metrics(report, grid):
    result, out = report
    t = result["tables"]
    sc = t["sparsity"]
    assert sc["sparsities"] == [0.001, 0.01]
    for (task, variant, sparsity), score in SCORES.items():
        metrics = json.loads((run_dir(grid, task, variant, sparsity) / "metrics.json").read_text())
        if variant == "full":
            assert sc["dense"]["full"][task] == metrics["final"]["dev"]["main"]
            continue
        assert sc["values"][LABEL[variant]][task][sparsity] == metrics["final"]["dev"]["main"] == score
        row = next(r for r in t["fixed_mask"]["rows"]
                   if (r["task"], r["variant"], r["sparsity"]) == (task, LABEL[variant], sparsity))
        assert row["l0"] == metrics["phases"]["l0"]["dev"]["main"]
        assert row["final"] == metrics["phases"]["fixed_mask"]["dev"]["main"]
        st = next(r for r in t["storage"]["rows"] if r["task"] == task and r["name"].startswith(LABEL[variant] + "@")
                  and r["sparsity"] == sparsity)
        assert st["stored_bytes"] == metrics["storage"]["stored_bytes"] > 0
        assert st["nnz"] == st["target_nnz"] == round(sparsity * metrics["storage"]["num_diff_params"])
    assert sc["average"]["diff-pruning-structured"][0.001] == pytest.approx((0.68 + 0.88) / 2)
    assert all(a["gain"] == pytest.approx(0.03) for a in t["fixed_mask"]["averages"])
    assert (out / "sparsity.png").stat().st_size > 1000


def test_training_curves_join_phases_and_drop_repeats(report):
    curves = report[0]["tables"]["curves"]["curves"]
    assert len(curves) == 8  # every Diff Pruning run, none of the full ones
    c = curves[0]
    assert c["step"] == list(range(1, 21))  # fixed-mask steps continue after the 10 of the L0 phase
    assert c["l0_step"] == list(range(1, 11)) and c["expected_l0_frac"][-1] == pytest.approx(0.1)
    assert c["phase_ends"] == [10]
    assert (report[1] / "training_curves.png").stat().st_size > 1000


def test_claims_follow_the_numbers(report):
    result, out = report
    assert len(result["claims"]) == 7
    first = [c for c in result["claims"] if "non-adaptive" not in c["claim"]][:3]
    assert all(c["status"] == "reproduced" for c in first), result["claims"]
    nadp = next(c for c in result["claims"] if "non-adaptive" in c["claim"])
    assert nadp["status"] == "not measured"  # the fixture has no non-adaptive runs
    full = next(c for c in result["claims"] if "full finetuning" in c["claim"])
    assert "diff-pruning-structured@1%" in full["evidence"] and "-0.5 points" in full["evidence"]
    untouched = next(c for c in result["claims"] if "untouched" in c["claim"])
    pooled = result["tables"]["untouched"]["pooled"]
    want = ("reproduced" if pooled["diff-pruning-structured"]["share"] > pooled["diff-pruning"]["share"]
            else "not reproduced")
    assert untouched["status"] == want
    graceful = next(c for c in result["claims"] if "gracefully" in c["claim"])
    assert graceful["status"] == "reproduced" and "1.5 points" in graceful["evidence"]
    storage = next(c for c in result["claims"] if "t·d" in c["claim"])
    assert storage["status"] == "reproduced" and "8 of 8" in storage["evidence"]
    md = (out / "report.md").read_text()
    for c in result["claims"]:
        assert f"**{c['status']}** — {c['claim']}" in md
    assert "64 (seeded random subset)" in md and "Training sets were capped" in md
    capped = ", ".join(f"{t}: 64" for t in result["info"]["tasks"])  # every fixture run keeps 64 examples
    assert f"(examples kept, per capped task: {capped})" in md and "each setting is one seed" in md
    assert "has not finished" in md and "lt-sft@0.01" in md  # the lt-sft run that never finished is named, not counted
    assert json.loads((out / "report.json").read_text())["claims"] == result["claims"]


def test_sections_without_data_say_so(grid, tmp_path):
    only_full = tmp_path / "runs"
    shutil.copytree(run_dir(grid, "rte", "full", None), only_full / "full")
    result = build_report([only_full / "full"], tmp_path / "rep")  # a run directory itself works too
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("_Not in these runs:") == 5  # everything but storage
    assert {c["status"] for c in result["claims"]} == {"not measured"}
    assert result["figures"] == {} and not list((tmp_path / "rep").glob("*.png"))
    assert main(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "r2")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffpruneError, match="no finished run"):
        build_report([tmp_path / "empty"], tmp_path / "r2")


def test_at_labels_parse_and_reject_bad_input():
    dp, lt, full = parse_entries(["diff-pruning-structured@0.001", "lt-sft@0.0025", "full"],
                                 ["lt-sft.lr=1e-4", "diff-pruning-structured@0.001.alpha_lr=0.05"], 2.0)
    assert (dp.label, dp.method) == ("diff-pruning-structured@0.001", "diff-pruning")
    assert dp.options["structured"] is True and dp.options["sparsity"] == 0.001 and dp.options["alpha_lr"] == 0.05
    assert lt.options["sparsity"] == 0.0025 and lt.options["lr"] == 1e-4 and "sparsity" not in full.options
    for bad, message in (("lt-sft@abc", "must be a sparsity"), ("full@0.01", "no sparsity option"),
                         ("lt-sft@0", r"in \(0, 1\]"), ("lt-sft@1.5", r"in \(0, 1\]"),
                         ("bitfitt@0.01", "did you mean")):
        with pytest.raises(DiffpruneError, match=message):
            parse_entries([bad], [], 1.0)
    assert grid_labels(["full", "lt-sft", "diff-pruning-structured"], [0.001, 0.01]) == [
        "full", "lt-sft@0.001", "lt-sft@0.01", "diff-pruning-structured@0.001", "diff-pruning-structured@0.01"]
    assert parse_sparsities("0.001, 0.0025") == [0.001, 0.0025]
    for bad in ("0.001,x", "2", ""):
        with pytest.raises(DiffpruneError):
            parse_sparsities(bad)


@pytest.mark.parametrize("name", ["lt-sft", "diff-pruning"])
def test_sparse_export_lists_every_diff_pruned_tensor(name):
    model = make_tiny("bert")
    method = get_method(name)(make_config(get_method(name), {"sparsity": 0.01}), model, list(HEAD))
    first = method.phases[0]
    method.build_phase(first)
    method.end_phase(first)  # untrained: the projection still fixes round(t·d) positions
    diff = method.export()
    expected = {n: p.numel() for n, p in model.named_parameters() if n not in HEAD}
    assert diff.extra["diff_tensors"] == expected
    assert sum(diff.extra["diff_tensors"].values()) == diff.extra["num_diff_params"]
    assert set(diff.sparse) <= set(expected)


def fake_glue(root):
    """A GLUE-layout folder whose SST-2 is the synthetic demo task (same columns: sentence, label)."""
    demo = write_demo_data(root / "demo")
    (root / "glue" / "SST-2").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(demo / name, root / "glue" / "SST-2" / name)
    return root / "glue"


def test_sweep_runs_the_grid_reports_and_reuses(tmp_path, tiny_model_dir, capsys):
    glue, out = fake_glue(tmp_path), tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_model_dir), "--tasks", "sst2", "--data-dir", str(glue),
            "--methods", "diff-pruning-structured", "--sparsities", "0.01,0.02", "--epochs", "1",
            "--max-train-samples", "32", "--max-eval-samples", "24", "--batch-size", "16", "--max-length", "16",
            "--output-dir", str(out)]
    assert main(args) == 0
    runs = out / "sst2" / "runs"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [
        "diff-pruning-structured@0.01", "diff-pruning-structured@0.02"]  # dense methods: grid_labels test
    diff = load_diff(runs / "diff-pruning-structured@0.02" / "diff")
    assert diff.config["sparsity"] == 0.02 and diff.config["structured"] is True
    assert sum(diff.extra["diff_tensors"].values()) == diff.extra["num_diff_params"]
    assert set(diff.sparse) <= set(diff.extra["diff_tensors"])

    result = json.loads((out / "report" / "report.json").read_text())
    assert result["info"]["num_runs"] == 2
    stats = diff_stats(diff, runs / "diff-pruning-structured@0.02" / "diff")
    h = result["tables"]["heatmap"]
    assert h["sparsity"] == 0.02 and h["matrix"] == [[stats["nnz_by_layer"].get(g, 0) for g in h["groups"]]]
    assert (out / "report" / "report.md").exists() and (out / "report" / "sparsity.png").exists()

    before = {p.name: (p / "metrics.json").read_text() for p in runs.iterdir() if p.is_dir()}
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, reused") == 2
    assert before == {p.name: (p / "metrics.json").read_text() for p in runs.iterdir() if p.is_dir()}
    assert main(args[:-1] + [str(tmp_path / "x"), "--sparsities", "0.01,abc"]) == 2


def test_claims_leave_out_tasks_where_diff_pruning_is_at_chance():
    from diffprune.report import claims

    s, u = claims.DP_VARIANTS
    sc = {"tasks": ["cola", "mrpc", "stsb"], "sparsities": [0.001, 0.01],
          "main_metric": {"cola": "mcc", "mrpc": "f1", "stsb": "spearman"},
          "values": {s: {"cola": {0.001: 0.0, 0.01: 0.01}, "mrpc": {0.001: 0.80, 0.01: 0.82},
                         "stsb": {0.001: 0.02, 0.01: 0.30}},
                     u: {"cola": {0.001: -0.03, 0.01: 0.0}, "mrpc": {0.001: 0.79, 0.01: 0.81},
                         "stsb": {0.001: 0.01, 0.01: 0.28}}},
          "dense": {"full": {"cola": 0.2, "mrpc": 0.83, "stsb": 0.5}}}
    tables = {"sparsity": sc}
    assert claims.at_chance(tables) == {"cola"}  # mrpc's F1 has no fixed chance level; stsb learned at 1%
    graceful = claims.graceful_degradation(tables)
    # over mrpc and stsb only: 1% (0.82 + 0.30)/2 = 56.0, 0.1% (0.80 + 0.02)/2 = 41.0 → a 15-point drop
    assert "over 2 task(s)" in graceful["evidence"] and "15.0 points" in graceful["evidence"]
    assert graceful["status"] == claims.NOT_REPRODUCED and "left out" in graceful["evidence"]
    versus = claims.structured_vs_unstructured(tables)
    assert "mean over 4 (task, sparsity) pairs" in versus["evidence"] and "cola" in versus["evidence"]


def test_runs_of_other_seeds_are_averaged_and_same_seed_repeats_noted(grid, tmp_path):
    from diffprune.report.collect import find_runs

    root = tmp_path / "runs"
    for seed, score in ((42, 0.70), (43, 0.60), (42, 0.10)):
        where = root / f"s{seed}" / ("full" if score != 0.10 else "full-again")
        shutil.copytree(run_dir(grid, "rte", "full", None), where)
        config = json.loads((where / "run_config.json").read_text())
        (where / "run_config.json").write_text(json.dumps({**config, "seed": seed}))
        metrics = json.loads((where / "metrics.json").read_text())
        metrics["final"]["dev"] = {"accuracy": score, "main": score}
        metrics["phases"]["finetune"]["dev"] = {"accuracy": score, "main": score}
        (where / "metrics.json").write_text(json.dumps(metrics))
    runs, notes = find_runs([root])
    assert len(runs) == 1 and runs[0].seeds == [42, 43]
    assert runs[0].dev_main == pytest.approx(0.65)  # (0.70 + 0.60) / 2; the same-seed repeat left out
    assert runs[0].phase_main("finetune") == runs[0].dev_main
    assert any("same seed" in n and "full-again" in n for n in notes)
    assert any("means over seeds 42, 43" in n for n in notes)


def test_adaptive_vs_non_adaptive_claim():
    """Structured beats non-adaptive on average, unstructured does not: not reproduced; a task where every
    run is at chance is left out, one where only Diff Pruning is at chance counts against it."""
    from diffprune.report import claims

    s, u, n = *claims.DP_VARIANTS, claims.NON_ADAPTIVE
    sc = {"tasks": ["cola", "mrpc", "stsb"], "sparsities": [0.005],
          "main_metric": {"cola": "mcc", "mrpc": "f1", "stsb": "spearman"},
          "values": {s: {"cola": {0.005: 0.01}, "mrpc": {0.005: 0.84}, "stsb": {0.005: 0.02}},
                     u: {"cola": {0.005: 0.0}, "mrpc": {0.005: 0.80}, "stsb": {0.005: 0.03}},
                     n: {"cola": {0.005: -0.02}, "mrpc": {0.005: 0.82}, "stsb": {0.005: 0.30}}}}
    got = claims.adaptive_vs_non_adaptive({"sparsity": sc})
    # cola left out (all three at chance); structured: mrpc +2, stsb −28 → mean −13.0; unstructured: −2, −27
    assert got["status"] == claims.NOT_REPRODUCED
    assert f"{s} − non-adaptive dev main, mean over 2 (task, sparsity) pair(s): -13.0 points, better in 1 of 2" \
        in got["evidence"]
    assert f"{u} − non-adaptive dev main, mean over 2 (task, sparsity) pair(s): -14.5 points, better in 0 of 2" \
        in got["evidence"]
    assert got["evidence"].endswith("cola")
    sc["values"][s]["stsb"][0.005] = sc["values"][u]["stsb"][0.005] = 0.40
    assert claims.adaptive_vs_non_adaptive({"sparsity": sc})["status"] == claims.REPRODUCED  # +6 and +4
    del sc["values"][n]
    assert claims.adaptive_vs_non_adaptive({"sparsity": sc})["status"] == claims.NOT_MEASURED


def test_storage_claim_gives_a_range_of_bytes_per_nonzero():
    from diffprune.report import claims

    rows = [{"target_nnz": 100, "nnz": 100, "bytes_per_nnz": 2.5, "stored_bytes": 400},
            {"target_nnz": 200, "nnz": 201, "bytes_per_nnz": 3.125, "stored_bytes": 1200}]
    got = claims.storage_scales_with_td({"storage": {"rows": rows}})
    assert got["status"] == claims.REPRODUCED
    # 400 / 800 = 0.50, 1200 / 1600 = 0.75
    assert "in 2 of 2" in got["evidence"] and "bytes per nonzero from 2.50 to 3.12" in got["evidence"]
    assert "from 0.50 to 0.75" in got["evidence"]
    rows[1]["nnz"] = 210
    assert claims.storage_scales_with_td({"storage": {"rows": rows}})["status"] == claims.NOT_REPRODUCED
