"""The report's plots (matplotlib, Agg backend), drawn from the tables of `tables.py`.

- nnz_heatmap.png: nonzeros of δ per layer group per task (the paper's Figure 2)
- sparsity.png: dev main metric against sparsity per method, full finetuning as a line (Figure 1)
- training_curves.png: expected L0 fraction and task loss over the training steps of Diff Pruning runs

Each file is written to a temporary name and renamed, so a reader never sees half a PNG.
"""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        _plt().close(fig)
    return path


def plot_heatmap(h: dict, path: Path) -> Path:
    """Rows tasks, columns layer groups; colour = share of the task's nonzeros, cell text = the count."""
    import numpy as np

    plt = _plt()
    counts = np.array(h["matrix"], dtype=float)  # (tasks, groups)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(h["groups"]) + 2), 0.6 * len(h["tasks"]) + 2))
    image = ax.imshow(100 * share, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(h["groups"])), h["groups"], rotation=45, ha="right")
    ax.set_yticks(range(len(h["tasks"])), h["tasks"])
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{int(counts[i, j]):,}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] < 0.6 * share.max() else "black")
    fig.colorbar(image, ax=ax, label="% of the task's nonzeros")
    ax.set_title(f"Nonzeros of δ per layer group: {h['variant']} at {100 * h['sparsity']:g}%")
    fig.tight_layout()
    return _save(fig, path)


def plot_sparsity(sc: dict, path: Path) -> Path:
    """One panel per task (and one for the average when there are several tasks)."""
    plt = _plt()
    panels = list(sc["tasks"]) + (["average"] if len(sc["tasks"]) > 1 else [])
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for variant in sc["variants"]:
            values = sc["average"].get(variant, {}) if panel == "average" else sc["values"][variant][panel]
            xs = sorted(values)
            if xs:
                ax.plot([100 * x for x in xs], [100 * values[x] for x in xs], marker="o", label=variant)
        full = sc["dense_average"].get("full") if panel == "average" else sc["dense"].get("full", {}).get(panel)
        if full is not None:
            ax.axhline(100 * full, color="black", linestyle="--", linewidth=1, label="full finetuning")
        ax.set_xscale("log")
        ticks = [100 * x for x in sc["sparsities"]]  # the same sparsity axis in every panel
        ax.set_xlim(min(ticks) / 1.3, max(ticks) * 1.3)
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("sparsity (share of diff-pruned entries kept)")
        metric = sc["main_metric"].get(panel, "main") if panel != "average" else "main metric"
        ax.set_ylabel(f"dev {metric} (×100)")
        ax.set_title(panel)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes.flat[0].legend(list(handles.values()), list(handles), fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(cv: dict, path: Path) -> Path:
    """Rows tasks; left: expected L0 fraction (log scale), right: task loss; one line per run."""
    plt = _plt()
    tasks = cv["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 2.8 * len(tasks) + 0.4), squeeze=False)
    for row, task in enumerate(tasks):
        left, right = axes[row]
        for c in (c for c in cv["curves"] if c["task"] == task):
            if c["l0_step"]:
                left.plot(c["l0_step"], c["expected_l0_frac"], label=c["name"])
            right.plot(c["step"], c["task_loss"], label=c["name"], linewidth=1)
            for end in c["phase_ends"]:
                right.axvline(end, color="grey", linestyle=":", linewidth=0.8)
        left.set_yscale("log")
        left.set_ylabel("E‖δ‖₀ / d")
        right.set_ylabel("task loss")
        for ax in (left, right):
            ax.set_title(task)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        left.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)
