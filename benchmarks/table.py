"""Collect finished runs (OUT/*/metrics.json) into a Markdown table: python benchmarks/table.py OUT"""
import json
import sys
from pathlib import Path


def main(root: str) -> None:
    rows = []
    for path in sorted(Path(root).glob("*/metrics.json")):
        m = json.loads(path.read_text())
        dev = next(iter(m["final"].values()))
        st = m.get("storage", {})
        secs = sum(p["train"]["seconds"] for p in m["phases"].values())
        steps = sum(p["train"]["steps"] for p in m["phases"].values())
        peak = max(p["train"]["peak_rss_mb"] for p in m["phases"].values())
        metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in dev.items() if k not in ("loss", "main"))
        pre = m["phases"].get("l0", {}).get("dev", {}).get("main")
        rows.append((m["task"], path.parent.name, metrics, f"{100 * pre:.1f}" if pre is not None else "",
                     (f"{100 * st['sparsity']:.2f}%" if st.get('sparsity') is not None else "100% (dense)"), f"{st.get('stored_bytes', 0):,}", steps,
                     f"{secs / 60:.1f}", f"{peak:.0f}"))
    print("| task | run | dev (final) | main after L0+projection | sparsity | stored bytes | steps | train min | peak RSS MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out/glue")
