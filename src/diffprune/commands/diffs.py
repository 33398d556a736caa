"""The subcommands that read a stored task diff: `diffprune eval`, `inspect` and `merge`.

    diffprune eval runs/rte --task rte --data-dir ../shared/data/glue [--output-dir ev/]
    diffprune inspect runs/rte [--json]
    diffprune merge runs/rte --output merged/

Their parsers and handlers live here (`add_parser(sub)` adds all three); they share `cli.add_task_args` /
`cli.task_spec` with training and raise `DiffpruneError` for every user mistake, which `cli.main` turns into
the one-line error. A QA diff (task kind "qa") is evaluated with the QA scorer and merged into a model that
`AutoModelForQuestionAnswering` loads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import DiffpruneError


def cmd_eval(args) -> int:
    import tempfile

    from ..api import check_diff_task, find_diff_dir, load_task_model
    from ..io import atomic_write_json
    from ..storage import load_diff
    from ..tasks import task_kind
    from ..train.pipeline import TrainConfig, eval_outputs, evaluate

    from ..cli import task_spec

    spec = task_spec(args)
    kind = task_kind(spec)
    diff = load_diff(find_diff_dir(args.run))
    for warning in check_diff_task(diff, spec, args.run):
        print(f"diffprune: warning: {warning}", file=sys.stderr)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and out.exists() and not out.is_dir():
        raise DiffpruneError(f"--output-dir {out} is an existing file; give a folder for metrics.json")
    data = kind.load(spec, args.data_dir, 1, args.max_eval_samples, args.seed)
    model, tokenizer, diff = load_task_model(args.run, base_model=args.base_model, diff=diff)
    max_length = diff.extra.get("max_length", 128)
    stride = diff.extra.get("doc_stride", 128)
    evals = {k: kind.eval_split(v, tokenizer, spec, max_length, stride) for k, v in data.evals.items()}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(output_dir=tmp, progress=False)
        results = evaluate(model, evals, spec, cfg, tokenizer, Path(tmp))
    if out is not None:  # only after a successful evaluation
        for name, value in eval_outputs(evals).items():
            atomic_write_json(out / name, value)
        atomic_write_json(out / "metrics.json", results)
    print(json.dumps(results, indent=2))
    return 0


def cmd_inspect(args) -> int:
    from ..api import find_diff_dir
    from ..storage import diff_stats, load_diff

    path = find_diff_dir(args.run)
    diff = load_diff(path)
    stats = diff_stats(diff, path)
    if args.json:
        print(json.dumps({"method": diff.method, "task": diff.task, "base_model": diff.base_model, **stats},
                         indent=2, default=str))
        return 0
    print(f"method {diff.method}  task {diff.task}  base {diff.base_model}")
    pct = stats.get("task_params_pct")
    print(f"parameters stored per task {stats['task_params']:,}"
          + (f" ({pct:.3f}% of the {stats['base_params']:,} pretrained parameters)" if pct is not None else ""))
    if stats["sparsity"] is not None:
        print(f"nonzeros {stats['nnz']:,} / {stats['num_diff_params']:,} diff-pruned parameters "
              f"(sparsity {100 * stats['sparsity']:.4f}%), {stats['sparse_bytes_per_nnz'] or 0:.2f} bytes per "
              "nonzero in the sparse part")
    print(f"dense parameters (trained or added tensors, head included) {stats['dense_params']:,}")
    print(f"stored bytes {stats['stored_bytes']:,}" + (f" (sparse values as {stats['value_dtype']})"
                                                       if stats["nnz"] and stats["value_dtype"] else ""))
    per = stats["bytes_per_nnz"] or {}
    for part, size in stats["bytes"].items():
        print(f"  {part:<14} {size:>12,} bytes" + (f"  {per[part]:.3f} per nonzero" if part in per else ""))
    if stats["nnz"]:
        print("nonzeros per layer:")
        for group, count in stats["nnz_by_layer"].items():
            print(f"  {group:<14} {count:>10,}")
    if stats["dense_params"]:
        print("dense parameters per layer:")
        for group, count in stats["dense_params_by_layer"].items():
            print(f"  {group:<14} {count:>10,}")
    return 0


def cmd_merge(args) -> int:
    from ..api import diff_kind, find_diff_dir, load_base_for_diff
    from ..models import resolve_model_path
    from ..storage import load_diff, merge_diff
    from ..tasks import task_kind
    from ..storage.apply import check_merge_output

    from ..methods import get_method

    diff = load_diff(find_diff_dir(args.run))
    base = args.base_model or diff.base_model
    out = Path(args.output)
    check_merge_output(out, base, Path(resolve_model_path(base)))  # before the slow model load
    method = get_method(diff.method)
    model, tokenizer, _ = load_base_for_diff(args.run, base, diff)
    model = method.attach(model, diff.config)
    out = merge_diff(model, diff, args.output, tokenizer, fold=method.fold)
    from ..heads import pruned_heads_of

    if pruned_heads_of(model.config):
        print(f"merged model written to {out} (head-pruned: load it with diffprune.heads.load_pruned('{out}'))")
    else:
        print(f"merged model written to {out} (loads with {task_kind(diff_kind(diff)).auto_class}.from_pretrained)")
    return 0


def add_parser(sub) -> None:
    """Adds eval, inspect and merge to the `diffprune` subparsers."""
    from ..cli import add_task_args

    e = sub.add_parser("eval", help="evaluate a stored task diff on a task's dev split(s)")
    e.add_argument("run", help="run directory (or diff directory)")
    add_task_args(e)
    e.add_argument("--base-model", help="base model to apply the diff to (default: the one recorded)")
    e.add_argument("--seed", type=int, default=42, help="seed of the --max-eval-samples subset (as in train)")
    e.add_argument("--output-dir", help="also write metrics.json (and for squad predictions.json) here")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="nonzeros, sparsity, stored bytes, nonzeros per layer")
    i.add_argument("run")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="write a standalone model with the diff merged in")
    m.add_argument("run")
    m.add_argument("--output", required=True)
    m.add_argument("--base-model")
    m.set_defaults(func=cmd_merge)
