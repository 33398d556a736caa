"""The tables and plot of `diffprune compare`: comparison.md, .csv and .png from the finished runs.

One row per method (`comparison_row`, from its metrics.json), with time and memory against full
finetuning when it is in the comparison; `write_outputs` rewrites all three files atomically.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write, atomic_write_text


def comparison_row(label: str, m: dict) -> dict:
    """One table row from a finished run's metrics.json."""
    row = {"method": label, "status": "failed"}
    st = m.get("storage", {})
    phases = m["phases"].values()
    seconds = sum(p["train"]["seconds"] for p in phases)
    steps = sum(p["train"]["steps"] for p in phases)
    row.update(status="ok", task=m["task"], main_metric=m["main_metric"],
               task_params=st.get("task_params"), task_params_pct=st.get("task_params_pct"),
               stored_bytes=st.get("stored_bytes"), sparsity=st.get("sparsity"),
               train_seconds=round(seconds, 1), steps=steps,
               seconds_per_step=round(seconds / steps, 4) if steps else None,
               peak_rss_mb=max(p["train"]["peak_rss_mb"] for p in phases))
    for split, values in m["final"].items():
        for key, value in values.items():
            if key not in ("loss", "main") and isinstance(value, (int, float)):
                row[f"{split}_{key}"] = value
        row.setdefault("dev_main", values.get("main", values.get(m["main_metric"])))
    return row


def _ratio(row: dict, ref: dict | None, key: str) -> float | None:
    if not ref or row.get(key) is None or not ref.get(key):
        return None
    return row[key] / ref[key]


def write_outputs(rows: list[dict], out: Path) -> None:
    """comparison.md, comparison.csv and comparison.png from the rows so far (atomic writes)."""
    ref = next((r for r in rows if r["method"] == "full" and r["status"] == "ok"), None)
    metric_keys = sorted({k for r in rows for k in r if k.startswith(("dev", "validation", "test"))
                          and k != "dev_main"})
    for r in rows:
        r["time_vs_full"] = _ratio(r, ref, "seconds_per_step")
        r["memory_vs_full"] = _ratio(r, ref, "peak_rss_mb")
    columns = (["method", "status", "task_params", "task_params_pct", "stored_bytes", *metric_keys, "train_seconds",
                "steps", "seconds_per_step", "time_vs_full", "peak_rss_mb", "memory_vs_full"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    atomic_write_text(out / "comparison.md", markdown(rows, metric_keys))
    if any(r["status"] == "ok" for r in rows):
        plot(rows, out / "comparison.png")


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{value:.3f}%" if value < 10 else f"{value:.1f}%"
    if kind == "metric":
        return f"{100 * value:.1f}"
    if kind == "ratio":
        return f"{value:.2f}x"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], metric_keys: list[str]) -> str:
    task = next((r["task"] for r in rows if r.get("task")), "?")
    head = (["method", "params/task", "% of base", "stored bytes"] + [k.replace("_", " ") for k in metric_keys]
            + ["train s", "s/step", "time vs full", "peak MiB", "memory vs full"])
    lines = [f"Task: {task}. Metrics ×100 on the dev split(s); params/task = everything stored for the task "
             "(nonzeros + dense tensors, head included).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | failed (see runs/{r['method']}.log) |" + " |" * (len(head) - 2))
            continue
        cells = [r["method"], _fmt(r["task_params"]), _fmt(r["task_params_pct"], "pct"), _fmt(r["stored_bytes"])]
        cells += [_fmt(r.get(k), "metric") for k in metric_keys]
        cells += [_fmt(r["train_seconds"]), _fmt(r["seconds_per_step"]), _fmt(r["time_vs_full"], "ratio"),
                  _fmt(round(r["peak_rss_mb"])), _fmt(r["memory_vs_full"], "ratio")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Dev main metric against stored bytes per task (log x), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get("stored_bytes") and r.get("dev_main") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        ax.scatter(r["stored_bytes"], 100 * r["dev_main"], s=40)
        ax.annotate(r["method"], (r["stored_bytes"], 100 * r["dev_main"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (log scale)")
    main = next((r["main_metric"] for r in ok), "metric")
    ax.set_ylabel(f"dev {main} (×100)")
    ax.set_title(f"{next((r['task'] for r in ok), '')}: accuracy against storage")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
