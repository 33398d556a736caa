"""SQuAD v1.1 benchmark: every method of recipe.json's "squad" entry on MiniLM, at one budget, resumable.

    python benchmarks/squad.py --data-dir ../shared/data/squad --out OUT [--workers 2] [--dry-run]
    python benchmarks/squad.py --data-dir ../shared/data/squad --out OUT --measure   # speed of the QA plumbing

Budget (benchmarks/recipe.json "squad"): windows of 256 tokens with a stride of 128, 2 epochs in total per
method (two-phase methods split them evenly, as grid.py does), batch 32, batches grouped by length (the
windows run from ~100 to 256 tokens: random batches of 32 pad to 256 and carry 1.48x the tokens), the
library's defaults otherwise;
structured Diff Pruning at the recipe's sparsity (0.5%). Each cell is one single-thread `diffprune train`
process in OUT/<label>/, `--workers` side by side (grid.py's scheduler); a finished cell is skipped and an
interrupted one resumed (`--resume`). OUT/results.md and results.json (EM, F1, stored bytes, training
minutes) are rewritten after every finished cell.

`--measure` trains nothing: it times the preprocessing of the whole train split into windows (features per
second) and the evaluation of an untrained MiniLM QA model on every dev question (windows, forward passes,
best-span search, EM/F1), in this process with one thread, and writes OUT/measure.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import grid  # noqa: E402
import recipe as recipes  # noqa: E402
from diffprune.io import atomic_write_json, atomic_write_text  # noqa: E402
from diffprune.report.collect import is_finished_run, load_run  # noqa: E402

TASK = "squad"


def budget(recipe: dict) -> dict:
    """The recipe with its "squad" entry's budget in place of the GLUE one."""
    return {**recipe, **{k: v for k, v in recipe["squad"].items() if k != "about"}}


def cells(recipe: dict, out: Path) -> list[grid.Cell]:
    todo = []
    for label in recipe["methods"]:
        method, options = grid.resolve(label)
        cls = grid.get_method(method)
        options.update(cls.budget(float(recipe["epochs"])))
        if "sparsity" in cls.config_class.__dataclass_fields__:
            options["sparsity"] = recipe["sparsity"]
        options.update(recipe.get("method_options", {}).get(label, {}))
        todo.append(grid.Cell(TASK, int(recipe["seed"]), label, out / label, method, options))
    return todo


def command(cell: grid.Cell, recipe: dict, data_dir: str) -> list[str]:
    cmd = [a for a in grid.command(cell, recipe, data_dir) if a != "--resume"]
    return cmd + ["--doc-stride", str(recipe["doc_stride"])] + \
        (["--group-by-length"] if recipe.get("group_by_length") else []) + \
        (["--resume"] if cell.run_dir.exists() else [])


def results(todo: list[grid.Cell], recipe: dict, out: Path) -> str:
    rows = []
    for c in todo:
        if not is_finished_run(c.run_dir):
            continue
        m = load_run(c.run_dir).metrics
        dev = m["final"]["dev"]
        rows.append({"method": c.label, "exact_match": dev["exact_match"], "f1": dev["f1"],
                     "stored_bytes": m["storage"]["stored_bytes"],
                     "minutes": round(sum(p["train"]["seconds"] for p in m["phases"].values()) / 60, 1)})
    lines = [f"SQuAD v1.1 (shared split, {TASK} dev: 1,988 questions), model {recipe['model']}, windows of "
             f"{recipe['max_length']} tokens with stride {recipe['doc_stride']}, {recipe['epochs']} epochs per method "
             f"(two-phase methods split them), batch {recipe['batch_size']}"
             f"{' grouped by length' if recipe.get('group_by_length') else ''}, sparsity {recipe['sparsity']}.", "",
             "| method | EM | F1 | stored bytes | training min |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {100 * r['exact_match']:.1f} | {100 * r['f1']:.1f} | {r['stored_bytes']:,} | "
              f"{r['minutes']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", rows)
    return text


def measure(recipe: dict, data_dir: str, out: Path) -> dict:
    """Preprocessing speed over the train split and the evaluation time of the dev split (one thread)."""
    import tempfile

    import torch

    from diffprune.models import load_model
    from diffprune.tasks import get_task, task_kind
    from diffprune.train.pipeline import TrainConfig, evaluate

    torch.set_num_threads(1)
    spec, length, stride = get_task(TASK), int(recipe["max_length"]), int(recipe["doc_stride"])
    kind = task_kind(spec)
    data = kind.load(spec, data_dir, None, None, int(recipe["seed"]))
    model, tok, _ = load_model(recipe["model"], auto_class=kind.auto_class, **kind.model_kwargs(spec))
    def timed(fn):
        """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
        figure an idle core would give; the wall time includes waiting for the core."""
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        return value, time.perf_counter() - wall, time.process_time() - cpu

    train, prep, prep_cpu = timed(lambda: kind.train_features(data.train, tok, spec, length, stride))
    evals, dev_prep, dev_prep_cpu = timed(lambda: {"dev": kind.eval_split(data.evals["dev"], tok, spec, length,
                                                                          stride)})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output_dir=tmp, progress=False, max_length=length, doc_stride=stride)
        scores, seconds, cpu = timed(lambda: evaluate(model.eval(), evals, spec, cfg, tok, Path(tmp))["dev"])
    result = {"threads": torch.get_num_threads(), "max_length": length, "doc_stride": stride,
              "load_average_1min": round(os.getloadavg()[0], 2),
              "train_questions": len(data.train), "train_features": len(train),
              "train_preprocess_seconds": round(prep, 2), "train_preprocess_cpu_seconds": round(prep_cpu, 2),
              "features_per_second": round(len(train) / prep, 1),
              "features_per_cpu_second": round(len(train) / prep_cpu, 1),
              "dev_questions": len(data.evals["dev"]), "dev_features": len(evals["dev"].dataset),
              "dev_preprocess_seconds": round(dev_prep, 2), "dev_preprocess_cpu_seconds": round(dev_prep_cpu, 2),
              "dev_eval_seconds": round(seconds, 1), "dev_eval_cpu_seconds": round(cpu, 1),
              "dev_eval_batch_size": cfg.eval_batch_size,
              "untrained_scores": {k: v for k, v in scores.items() if k in ("exact_match", "f1", "loss")}}
    atomic_write_json(out / "measure.json", result)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/squad")
    p.add_argument("--out", default="benchmarks/out/squad")
    p.add_argument("--recipe", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the commands of the cells still to run")
    p.add_argument("--measure", action="store_true", help="time preprocessing and evaluation, train nothing")
    args = p.parse_args()
    recipe = budget(recipes.load(args.recipe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.measure:
        import json

        print(json.dumps(measure(recipe, args.data_dir, out), indent=2))
        return 0
    todo = cells(recipe, out)
    pending = [c for c in todo if not c.done]
    print(f"{len(todo)} cells, {len(todo) - len(pending)} done, {len(pending)} to run in {out}", flush=True)
    if args.dry_run:
        return grid.print_commands(pending, lambda c: command(c, recipe, args.data_dir))
    failed = grid.run_cells(pending, lambda c: command(c, recipe, args.data_dir), args.workers, grid.bench_env(),
                            lambda: results(todo, recipe, out))
    print(results(todo, recipe, out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
