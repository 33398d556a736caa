"""The `diffprune` command line: train, eval, inspect, merge, compare, importance, sweep, report, convert,
compose, serve.

    diffprune train --model minilm --task rte --data-dir ../shared/data/glue --method diff-pruning \
        --structured --sparsity 0.005 --output-dir runs/rte
    diffprune eval runs/rte --task rte --data-dir ../shared/data/glue
    diffprune train --task squad --data-dir ../shared/data/squad --max-length 256 --doc-stride 128 \
        --method lora --output-dir runs/squad      # extractive QA: EM / F1, predictions.json
    diffprune inspect runs/rte [--json]
    diffprune merge runs/rte --output merged/
    diffprune compare --task rte --data-dir ../shared/data/glue --methods full,bitfit,lora --output-dir cmp/
    diffprune importance --task rte --data-dir ../shared/data/glue --output heads/
    diffprune sweep --tasks rte,mrpc --data-dir ../shared/data/glue --sparsities 0.001,0.005 --output-dir sw/
    diffprune report sw/ --output sw/report
    diffprune convert runs/rte --dtype bfloat16 --output rte-bf16/
    diffprune compose runs/rte runs/mrpc --method ties --density 0.5 --head-from runs/rte --output merged-diff/
    diffprune serve --base minilm --diffs runs/ --port 8000
A user mistake prints one line `diffprune: error: …` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .commands import compose, convert, diffs, serve
from .errors import DiffpruneError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is the promised single `diffprune: error:` line (exit status 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class UsageError(Exception):
    pass


def add_task_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", help="GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte wnli), squad (extractive "
                                  "QA), or a name for --train-file data", required=False)
    p.add_argument("--data-dir", help="GLUE-layout data folder, or for squad a folder with train.json/dev.json "
                                      "(default: the hub through `datasets`)")
    p.add_argument("--train-file", help="your own CSV/TSV/JSONL training file (header required); with --task "
                                        "squad a SQuAD-format JSON file")
    p.add_argument("--dev-file", help="your own dev file, same columns")
    p.add_argument("--text-columns", help="comma-separated text column(s) of --train-file, e.g. premise,hypothesis")
    p.add_argument("--label-column", default="label", help="label column of --train-file (default: label)")
    p.add_argument("--regression", action="store_true", help="--train-file labels are real numbers")
    p.add_argument("--max-eval-samples", type=int)


def task_spec(args):
    from .tasks import custom_task, get_task

    try:  # a registered QA task reads the user's SQuAD files; any other name is a custom table task
        known = get_task(args.task) if args.task else None
    except DiffpruneError:
        known = None
    if known is not None and known.kind == "qa" and (args.train_file or args.dev_file):
        from .tasks.qa import squad_files

        if not (args.train_file and args.dev_file):
            raise DiffpruneError(f"your own {known.name} data needs --train-file and --dev-file together")
        return squad_files(known, args.train_file, args.dev_file)
    if args.train_file or args.dev_file:
        if not (args.train_file and args.dev_file and args.text_columns):
            raise DiffpruneError("your own data needs --train-file, --dev-file and --text-columns together")
        return custom_task(args.train_file, args.dev_file, args.text_columns.split(","), args.label_column,
                           regression=args.regression, name=args.task or "custom")
    if not args.task:
        raise DiffpruneError("--task is required (a GLUE task name, or --train-file/--dev-file for your own data)")
    return get_task(args.task)


def max_length_for(args, spec) -> int:
    """--max-length, else the task kind's default (128 tokens for classification, 384 for QA windows)."""
    from .tasks import task_kind

    return args.max_length if args.max_length is not None else task_kind(spec).default_max_length


def cmd_train(args) -> int:
    from .api import train

    spec = task_spec(args)
    options = {k: v for k, v in dict(
        sparsity=args.sparsity, structured=True if args.structured else None, epochs=args.epochs,
        l0_epochs=args.l0_epochs, lr=args.lr, alpha_lr=args.alpha_lr, l0_lambda=args.l0_lambda,
        gate_choice=args.gate_choice, include=args.include, exclude=args.exclude).items() if v is not None}
    for item in args.set or []:
        if "=" not in item:
            raise DiffpruneError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.replace("-", "_")] = _parse_value(value)
    for flag, value in (("--lr", args.lr), ("--epochs", args.epochs), ("--l0-epochs", args.l0_epochs),
                        ("--alpha-lr", args.alpha_lr), ("--l0-lambda", args.l0_lambda),
                        ("--sparsity", args.sparsity), ("--warmup", args.warmup)):
        check_finite_flag(flag, value)
    metrics = train(output_dir=args.output_dir, task=spec.name, model=args.model, method=args.method, spec=spec,
                    method_options=options, data_dir=args.data_dir, batch_size=args.batch_size,
                    max_length=max_length_for(args, spec), doc_stride=args.doc_stride, seed=args.seed,
                    max_train_samples=args.max_train_samples,
                    max_eval_samples=args.max_eval_samples, resume=args.resume, overwrite=args.overwrite,
                    warmup=args.warmup, save_steps=args.save_steps, logging_steps=args.logging_steps,
                    progress=not args.no_progress, diff_dtype=args.diff_dtype,
                    group_by_length=args.group_by_length)
    if metrics.get("final") is not None:
        print_summary(args.output_dir, metrics)
    return 0


def check_finite_flag(flag: str, value) -> None:
    """argparse's float() takes 'nan' and 'inf'; no flag of ours means either."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise DiffpruneError(f"{flag} must be a finite number, got {value}")


def print_summary(output_dir: str, metrics: dict) -> None:
    main = metrics["main_metric"]
    for split, values in metrics["final"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float) and k != "loss")
        print(f"{split}: {shown}  (main: {main})")
    st = metrics.get("storage", {})
    if st and st.get("sparsity") is None:
        print(f"stored: {st['dense_params']:,} dense parameters, {st['stored_bytes']:,} bytes")
    elif st:
        print(f"diff: {st['nnz']:,} nonzeros of {st['num_diff_params']:,} diff-pruned parameters "
              f"(sparsity {100 * st['sparsity']:.3f}%), {st['stored_bytes']:,} bytes stored "
              f"({st.get('sparse_bytes_per_nnz', 0):.2f} bytes per nonzero)")
    print(f"task diff: {Path(output_dir) / 'diff'}   metrics: {Path(output_dir) / 'metrics.json'}")


def train_flags(args, task: str) -> list[str]:
    """The `diffprune train` flags shared by every run that `compare` or `sweep` starts for `task`."""
    flags = ["--model", args.model, "--task", task, "--batch-size", str(args.batch_size),
             "--seed", str(args.seed), "--warmup", str(args.warmup)] + \
        (["--group-by-length"] if args.group_by_length else [])
    for flag, value in (("--max-length", args.max_length), ("--doc-stride", args.doc_stride),
                        ("--data-dir", args.data_dir), ("--train-file", args.train_file),
                        ("--dev-file", args.dev_file), ("--text-columns", args.text_columns),
                        ("--max-train-samples", args.max_train_samples),
                        ("--max-eval-samples", args.max_eval_samples)):
        if value is not None:
            flags += [flag, str(value)]
    if args.train_file and args.text_columns:  # not SQuAD files, which have no columns
        flags += ["--label-column", args.label_column] + (["--regression"] if args.regression else [])
    return flags


def cmd_compare(args) -> int:
    from .compare import DEFAULT_METHODS, parse_entries, run_all

    spec = task_spec(args)  # validates the task before any run starts
    check_finite_flag("--epochs", args.epochs)
    check_finite_flag("--warmup", args.warmup)
    if args.epochs <= 0:
        raise DiffpruneError(f"--epochs must be positive, got {args.epochs}")
    labels = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    entries = parse_entries(labels, args.set or [], args.epochs)
    common = train_flags(args, spec.name)
    out = Path(args.output_dir)
    rows = run_all(entries, out, common)
    print()
    print((out / "comparison.md").read_text())
    print(f"table: {out / 'comparison.md'}  csv: {out / 'comparison.csv'}  plot: {out / 'comparison.png'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def cmd_importance(args) -> int:
    from .heads.importance import run_importance

    spec = task_spec(args)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise DiffpruneError(f"--output {args.output} is an existing file; give a folder for the importance files")
    result = run_importance(args.model, spec, args.data_dir, args.output, num_examples=args.num_examples,
                            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    ranking = result.get("ranking", [])
    print(f"heads from most to least important ({len(ranking)} scored):")
    for item in ranking[: args.show]:
        print(f"  {item['rank']:>3}. layer {item['layer']} head {item['head']}  {item['score']:.4f}")
    if len(ranking) > args.show:
        print(f"  … {len(ranking) - args.show} more in {result['files'].get('json')}")
    print("written: " + ", ".join(str(p) for p in result["files"].values()))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    result = build_report(args.runs, args.output)
    out = Path(args.output)
    print(f"{result['info']['num_runs']} runs; claims:")
    for claim in result["claims"]:
        print(f"  {claim['status']:<15} {claim['claim']}")
    print(f"report: {out / 'report.md'}  numbers: {out / 'report.json'}  figures: "
          + (", ".join(str(out / name) for name in result["figures"].values()) or "none"))
    return 0


def cmd_sweep(args) -> int:
    import copy

    from .sweep import DEFAULT_SPARSITIES, DEFAULT_SWEEP_METHODS, grid_labels, parse_sparsities, run_sweep

    tasks = [t.strip() for t in (args.tasks or args.task or "").split(",") if t.strip()]
    if not tasks:
        raise DiffpruneError("--tasks is required, e.g. --tasks rte,mrpc")
    if args.train_file and len(tasks) != 1:
        raise DiffpruneError("--train-file data is one task: give a single name in --tasks")
    check_finite_flag("--epochs", args.epochs)
    check_finite_flag("--warmup", args.warmup)
    if args.epochs <= 0:
        raise DiffpruneError(f"--epochs must be positive, got {args.epochs}")
    specs = {}
    for task in tasks:  # every task is checked before any run starts
        task_args = copy.copy(args)
        task_args.task = task
        specs[task] = task_spec(task_args)
    methods = [m.strip() for m in (args.methods or ",".join(DEFAULT_SWEEP_METHODS)).split(",") if m.strip()]
    sparsities = parse_sparsities(args.sparsities) if args.sparsities else list(DEFAULT_SPARSITIES)
    labels = grid_labels(methods, sparsities)

    def common_for(task: str) -> list[str]:
        return train_flags(args, specs[task].name)

    out = Path(args.output_dir)
    ok = run_sweep(tasks, labels, args.set or [], args.epochs, common_for, out)
    print(f"tables per task: {out}/<task>/comparison.md   report: {out / 'report' / 'report.md'}")
    return 0 if ok else 1


GROUP_BY_LENGTH_HELP = ("batch inputs of similar lengths (shuffled groups of them: the Trainer's length-grouped "
                        "sampler); less padding, so faster where lengths vary, as SQuAD's windows do; changes which "
                        "examples share a batch")


def add_budget_args(p: argparse.ArgumentParser, set_help: str) -> None:
    """The shared budget of every run that `compare` and `sweep` start, and per-method options."""
    p.add_argument("--epochs", type=float, default=3.0, help="total epochs per run (split over phases)")
    p.add_argument("--set", action="append", metavar="[METHOD.]KEY=VALUE", help=set_help)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="tokens per input (default: 128; 384 for squad)")
    p.add_argument("--doc-stride", type=int, help="squad: tokens shared by neighbouring windows (default 128)")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--group-by-length", action="store_true",
                   help=GROUP_BY_LENGTH_HELP)
    p.add_argument("--seed", type=int, default=42)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a task diff (or any other method) and store it")
    t.add_argument("--model", default="minilm", help="hub id, local model directory, or 'minilm' (embedded)")
    add_task_args(t)
    t.add_argument("--method", default="diff-pruning")
    t.add_argument("--output-dir", required=True)
    t.add_argument("--structured", action="store_true", help="structured Diff Pruning (one group gate per tensor)")
    t.add_argument("--sparsity", type=float, help="share of diff-pruned entries kept (default 0.005 = 0.5%%)")
    t.add_argument("--epochs", type=float, help="epochs of the (last) training phase")
    t.add_argument("--l0-epochs", type=float, help="epochs of Diff Pruning's L0 phase")
    t.add_argument("--lr", type=float)
    t.add_argument("--gate-choice", choices=("magnitude", "learned"),
                   help="Diff Pruning: which entries the L0 phase keeps open as it closes the diff down to "
                   "--sparsity: those of largest |w| (default) or learned Hard-Concrete gates steered to the "
                   "schedule")
    t.add_argument("--alpha-lr", type=float, help="AdamW learning rate of learned gates α (default: the paper's 0.1 "
                   "with --l0-lambda; sized to the budget with --gate-choice learned)")
    t.add_argument("--l0-lambda", type=float, help="the paper's mode: a fixed weight λ of E‖δ‖₀ and learned gates "
                   "(the paper: 1.25e-7 for BERT-large). Default: none; the L0 phase closes the diff on a "
                   "schedule down to --sparsity itself")
    t.add_argument("--include", action="append", help="diff-prune only parameters matching this pattern")
    t.add_argument("--exclude", action="append", help="leave parameters matching this pattern frozen")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other method option")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--max-length", type=int, help="tokens per input (default: 128; 384 for squad's windows)")
    t.add_argument("--doc-stride", type=int, default=128, help="squad: tokens shared by neighbouring windows of a "
                   "long context (default 128; 0: no windows, a context that does not fit is an error)")
    t.add_argument("--max-train-samples", type=int)
    t.add_argument("--warmup", type=float, default=0.0)
    t.add_argument("--group-by-length", action="store_true",
                   help=GROUP_BY_LENGTH_HELP)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save-steps", type=int, default=200)
    t.add_argument("--logging-steps", type=int, default=20)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--diff-dtype", choices=["float16", "bfloat16", "float32", "int8"],
                   help="dtype of the stored sparse values (default: the base model's dtype when it is a half "
                        "type, else float16; int8 is lossy; `final` metrics are those of the stored diff)")
    t.set_defaults(func=cmd_train)

    diffs.add_parser(sub)  # eval, inspect, merge: parsers and handlers in commands/diffs.py
    c = sub.add_parser("compare", help="train (or reuse) several methods on one task; table, CSV and plot")
    c.add_argument("--model", default="minilm")
    add_task_args(c)
    c.add_argument("--methods", help="comma-separated methods (default: all); also diff-pruning-structured")
    c.add_argument("--output-dir", required=True, help="runs go to OUT/runs/<method>; finished ones are reused")
    add_budget_args(c, "method option for all methods, or one (e.g. lora.lr=5e-4)")
    c.set_defaults(func=cmd_compare)

    h = sub.add_parser("importance", help="task-oriented attention-head importance (scores, ranking, heatmap)")
    h.add_argument("--model", default="minilm")
    add_task_args(h)
    h.add_argument("--output", required=True, help="directory for importance.json/.safetensors/.png")
    h.add_argument("--num-examples", type=int, default=256, help="training examples scored (default 256)")
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--max-length", type=int, default=128)
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--show", type=int, default=10, help="ranking lines printed")
    h.set_defaults(func=cmd_importance)

    s = sub.add_parser("sweep", help="methods × sparsities × tasks through compare, then the report")
    s.add_argument("--tasks", help="comma-separated GLUE tasks, e.g. rte,mrpc (one name for --train-file data)")
    s.add_argument("--model", default="minilm")
    add_task_args(s)
    s.add_argument("--methods", help="comma-separated methods (default: full,diff-pruning,"
                                     "diff-pruning-structured); those with a sparsity run at each --sparsities")
    s.add_argument("--sparsities", help="shares kept by the sparse methods (default 0.001,0.0025,0.005,0.01)")
    s.add_argument("--output-dir", required=True, help="OUT/<task>/runs/<label>/ per run, OUT/report/ at the end")
    add_budget_args(s, "method option for all runs, or one method at every sparsity (e.g. lt-sft.lr=1e-4)")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="the paper's tables, figures and claims from finished runs")
    r.add_argument("runs", nargs="+", help="run directories, or folders holding runs (compare/sweep outputs)")
    r.add_argument("--output", required=True, help="directory for report.md, report.json and the PNGs")
    r.set_defaults(func=cmd_report)
    for command in (convert, compose, serve):  # subcommands kept in diffprune/commands/
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"diffprune: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except DiffpruneError as exc:
        print(f"diffprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffprune: interrupted (use --resume to continue a training run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
