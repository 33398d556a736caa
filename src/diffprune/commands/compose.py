"""`diffprune compose A B … --output C`: one diff from several diffs of the same base model.

    diffprune compose lang/ task/ --output both/                       # sum: a language diff + a task diff
    diffprune compose rte/ mrpc/ --method ties --density 0.5 --weights 1,1 --head-from rte/ --output m/

The methods and the rules for dense tensors (task heads) are those of `diffprune.storage.compose`. Every
check that needs no model runs before the base model is loaded (to verify the fingerprints and fingerprint
the result), and nothing is written unless all of them pass.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiffpruneError
from ..storage.codec import VALUE_DTYPES
from ..storage.compose import METHODS
from .convert import check_output


def add_parser(sub) -> None:
    p = sub.add_parser("compose", help="add diffs of one base model (sum) or merge task diffs (linear, ties, dare)")
    p.add_argument("diffs", nargs="+", help="run or diff directories (two or more)")
    p.add_argument("--output", required=True, help="folder for the composed diff")
    p.add_argument("--method", default="sum", choices=list(METHODS),
                   help="sum (default: plain addition), linear (weighted sum), ties, dare (= PEFT's dare_linear), "
                        "dare_ties")
    p.add_argument("--weights", help="comma-separated weight per diff (linear, ties, dare; default 1 each)")
    p.add_argument("--density", type=float, help="ties/dare: share of each diff's nonzeros kept (0 < d <= 1)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    p.add_argument("--head-from", help="the input (as given) whose dense tensors (task head) the result takes "
                                       "where several diffs replace the same tensor")
    p.add_argument("--base-model", help="base model to check the diffs against (default: the first diff's)")
    p.add_argument("--dtype", choices=list(VALUE_DTYPES),
                   help="stored value dtype (default: the inputs' when they agree, else float32)")
    p.set_defaults(func=run)


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise DiffpruneError(f"--weights expects comma-separated numbers, e.g. 1,0.5; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..api import find_diff_dir, load_base_for_diff
    from ..storage import diff_stats, load_diff, save_diff
    from ..storage.compose import check_composable, compose_diffs

    out = Path(args.output)
    check_output(out)
    dirs = [find_diff_dir(d) for d in args.diffs]
    if out.exists() and any(out.resolve() == d.resolve() for d in dirs):
        raise DiffpruneError(f"--output {out} is one of the input diffs; write the composition elsewhere")
    head_from = None
    if args.head_from is not None:
        matches = [i for i, (given, d) in enumerate(zip(args.diffs, dirs))
                   if args.head_from == given or Path(args.head_from).exists()
                   and find_diff_dir(args.head_from).resolve() == d.resolve()]
        if not matches:
            raise DiffpruneError(f"--head-from {args.head_from} is not one of the inputs ({', '.join(args.diffs)})")
        head_from = matches[0]
    weights = _weights(args.weights)
    diffs = [load_diff(d) for d in dirs]
    options = dict(method=args.method, weights=weights, density=args.density, head_from=head_from,
                   labels=list(args.diffs))
    check_composable(diffs, **options)  # everything that needs no model, before loading one

    base = args.base_model or diffs[0].base_model
    model, _, _ = load_base_for_diff(None, base, diffs[head_from if head_from is not None else 0])
    result = compose_diffs(diffs, seed=args.seed, base_model=model, **options)
    result.base_model = base  # the model it was checked and fingerprinted on
    dtypes = {d.value_dtype for d in diffs}
    dtype = args.dtype or (dtypes.pop() if len(dtypes) == 1 else "float32")
    save_diff(result, out, None, value_dtype=dtype)
    stats = diff_stats(result, out)
    inputs = ", ".join(f"{name} {d.nnz:,}" for name, d in zip(args.diffs, diffs))
    print(f"{args.method} of {len(diffs)} diffs (nonzeros: {inputs}) → {out}: {stats['nnz']:,} nonzeros, "
          f"{len(result.dense)} dense tensors, task {result.task}, values {dtype}, {stats['stored_bytes']:,} bytes")
    return 0
