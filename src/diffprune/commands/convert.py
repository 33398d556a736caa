"""`diffprune convert DIFF --dtype D --output OUT`: rewrite a stored diff in another value dtype / format.

Converting never touches the input until the new diff is complete (it is loaded whole first, then written
through `save_diff`'s atomic directory swap), and `--output` may only be a new or empty folder or a diff
made by diffprune (converting in place is allowed: that is what the swap is for).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiffpruneError
from ..storage.codec import VALUE_DTYPES


def check_output(out: Path, what: str = "diff") -> None:
    """The rule of `save_diff`'s atomic directory, checked before any slow work."""
    from ..storage import CONFIG_FILE

    if out.exists() and not out.is_dir():
        raise DiffpruneError(f"--output {out} is an existing file; give a folder for the {what}")
    blocked = [p for p in out.parents if p.exists() and not p.is_dir()]
    if blocked:
        raise DiffpruneError(f"--output {out}: {blocked[0]} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise DiffpruneError(f"refusing to overwrite {out}: it is a non-empty folder that is not a diff made by "
                             "diffprune; choose another --output or remove it yourself")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a stored diff with other value dtypes (compact format)")
    p.add_argument("run", help="run directory or diff directory")
    p.add_argument("--dtype", required=True, choices=list(VALUE_DTYPES),
                   help="dtype of the sparse values (int8 is lossy: per-tensor absmax)")
    p.add_argument("--output", required=True, help="folder for the converted diff (may be the input itself)")
    p.add_argument("--format-version", type=int, choices=[1, 2], default=2,
                   help="2 (compact, default) or 1 (int32 positions + float32 values, for older diffprune)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import find_diff_dir
    from ..storage import diff_stats, load_diff, save_diff

    src = find_diff_dir(args.run)
    out = Path(args.output)
    check_output(out)
    if args.format_version == 1 and args.dtype != "float32":
        raise DiffpruneError(f"format version 1 stores float32 values only, not {args.dtype}")
    diff = load_diff(src)
    before = diff_stats(diff, src)
    original = {n: d.values.clone() for n, d in diff.sparse.items()}
    save_diff(diff, out, None, value_dtype=args.dtype, format_version=args.format_version)
    converted = load_diff(out)
    after = diff_stats(converted, out)
    change = max((float((converted.sparse[n].values - v).abs().max()) for n, v in original.items() if v.numel()),
                 default=0.0)
    print(f"{src} ({before['value_dtype']}, {before['stored_bytes']:,} bytes) → {out} ({args.dtype}, "
          f"{after['stored_bytes']:,} bytes)")
    if after["nnz"]:
        print(f"sparse part {after['sparse_bytes_per_nnz']:.3f} bytes per nonzero (was "
              f"{before['sparse_bytes_per_nnz']:.3f}); largest change of a value {change:.3g}")
    return 0
