"""Bytes per nonzero of stored diffs, format 1 against the compact format 2 in each value dtype, and (with
--eval) the dev metric of each dtype against float32 values.

    PYTHONPATH=src python benchmarks/diff_bytes.py /work/bench/grid/*/s42/*/diff \
        --eval --data-dir /work/shared/data/glue --work /tmp/diff-bytes

For every input diff it writes the conversions under --work (never next to the input), measures
diff.safetensors (header included: the number the goal counts), its sparse part alone (positions +
values) and the positions as plain LEB128 without deflate (what the deflate stage buys), and with --eval
runs `diffprune eval` on the float32 conversion and on each smaller dtype. Diffs without a sparse part
(full finetuning) are listed but not converted: the value dtype only applies to sparse values.

The float32 values are the trained ones: a run's `diff/` stored in a 16-bit dtype (train's default) holds
rounded values, so for `<run>/diff` the source of every conversion is the run's float32 snapshot of its
last phase (`<run>/phases/<last>/snapshot`, the same positions, the values before rounding) when it has one;
"v1 file" is then what format 1 would store for that diff (float32 values, int32 positions).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from diffprune.storage import TENSOR_FILE, diff_stats, load_diff, save_diff
from diffprune.storage import codec
from diffprune.tasks import get_task

DTYPES = ("float32", "float16", "bfloat16", "int8")


def label(path: Path) -> str:
    parts = path.resolve().parts
    return "/".join(parts[-4:-1]) if path.name == "diff" else path.name


def plain_leb128_bytes(diff) -> int:
    import numpy as np

    gaps = [codec.gaps_of(d.indices) for _, d in sorted(diff.sparse.items())]
    return int(codec.leb128_encode(np.concatenate(gaps)).size) if gaps else 0


def float32_source(path: Path) -> tuple[Path, object]:
    """(folder, diff) holding float32 trained values for the diff at `path` (see the module docstring)."""
    diff = load_diff(path)
    if diff_stats(diff, path)["value_dtype"] in (None, "float32") or path.name != "diff":
        return path, diff
    try:
        last = list(json.loads((path.parent / "metrics.json").read_text())["phases"])[-1]
    except (OSError, ValueError, KeyError, IndexError):
        return path, diff
    snapshot = path.parent / "phases" / last / "snapshot"
    if not (snapshot / TENSOR_FILE).is_file():
        return path, diff
    source = load_diff(snapshot)
    if diff_stats(source, snapshot)["value_dtype"] != "float32" or source.nnz != diff.nnz:
        return path, diff
    print(f"{label(path)}: float32 values from {snapshot}", file=sys.stderr)
    return snapshot, source


def dev_metric(diff_dir: Path, task: str, data_dir: str) -> float:
    out = subprocess.run([sys.executable, "-m", "diffprune", "eval", str(diff_dir), "--task", task,
                          "--data-dir", data_dir], capture_output=True, text=True, check=True).stdout
    return 100 * json.loads(out)["dev"][get_task(task).main_metric]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("diffs", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/diff-bytes"), help="where conversions are written")
    ap.add_argument("--eval", action="store_true", help="also run diffprune eval per dtype")
    ap.add_argument("--data-dir", default="/work/shared/data/glue")
    args = ap.parse_args()

    rows, metrics = [], []
    for given in args.diffs:
        name = label(given)
        path, diff = float32_source(given)
        if not diff.nnz:
            print(f"{name}: no sparse part ({len(diff.dense)} dense tensors), skipped", file=sys.stderr)
            continue
        v1 = args.work / name.replace("/", "_") / "format1"
        save_diff(diff, v1, None, value_dtype="float32", format_version=1)
        old = diff_stats(load_diff(v1), v1)
        file_old = (v1 / TENSOR_FILE).stat().st_size
        row = {"diff": name, "nnz": diff.nnz, "v1 file": file_old / diff.nnz,
               "v1 sparse": old["sparse_bytes_per_nnz"], "leb128 only": plain_leb128_bytes(diff) / diff.nnz}
        scores = {}
        for dtype in DTYPES:
            out = args.work / name.replace("/", "_") / dtype
            save_diff(diff, out, None, value_dtype=dtype)
            st = diff_stats(load_diff(out), out)
            row[f"{dtype} file"] = (out / TENSOR_FILE).stat().st_size / diff.nnz
            row[f"{dtype} sparse"] = st["sparse_bytes_per_nnz"]
            row[f"{dtype} pos"] = st["bytes_per_nnz"]["positions"]
            row[f"{dtype} +config"] = st["stored_bytes"] / diff.nnz
            if args.eval:
                scores[dtype] = dev_metric(out, diff.task, args.data_dir)
                print(f"  {name} {dtype}: {scores[dtype]:.2f}", file=sys.stderr)
        rows.append(row)
        if scores:
            metrics.append((name, get_task(diff.task).main_metric, scores))

    print("bytes per nonzero (file = diff.safetensors incl. header and the dense head; sparse = positions + "
          "values; +config adds diff_config.json)\n")
    print("| diff | nnz | v1 file | v1 sparse | LEB128 positions, no deflate | positions | float32 file | "
          "float16 file | float16 sparse | bfloat16 file | bfloat16 sparse | int8 file | int8 sparse | "
          "float16 file +config |")
    print("|---|---:|" + "---:|" * 12)
    for r in rows:
        print(f"| {r['diff']} | {r['nnz']:,} | {r['v1 file']:.2f} | {r['v1 sparse']:.2f} | {r['leb128 only']:.3f} "
              f"| {r['float16 pos']:.3f} | {r['float32 file']:.3f} | {r['float16 file']:.3f} | "
              f"{r['float16 sparse']:.3f} | {r['bfloat16 file']:.3f} | {r['bfloat16 sparse']:.3f} | "
              f"{r['int8 file']:.3f} | {r['int8 sparse']:.3f} | {r['float16 +config']:.3f} |")
    if metrics:
        print("\ndev main metric (×100) with float32 values, and the change with each smaller dtype\n")
        print("| diff | metric | float32 | float16 Δ | bfloat16 Δ | int8 Δ |")
        print("|---|---|---:|---:|---:|---:|")
        for name, metric, s in metrics:
            f32 = s["float32"]
            print(f"| {name} | {metric} | {f32:.2f} | {s['float16'] - f32:+.2f} | {s['bfloat16'] - f32:+.2f} | "
                  f"{s['int8'] - f32:+.2f} |")


if __name__ == "__main__":
    main()
