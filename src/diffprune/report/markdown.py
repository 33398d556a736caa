"""report.md: the run settings, the claims, then one section per table of `tables.py`.

A section whose data the runs do not hold is replaced by one line saying what it would need.
Metrics are shown × 100 with one decimal.
"""
from __future__ import annotations

from .collect import fmt_sparsity


def _m(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _n(x) -> str:
    if x is None:
        return "–"
    return f"{x:,}" if isinstance(x, int) else f"{x:.3g}"


def _table(head: list[str], rows: list[list[str]], align_first: int = 1) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * align_first + "---:|" * (len(head) - align_first)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _missing(what: str) -> list[str]:
    return [f"_Not in these runs: {what}._", ""]


def header(info: dict) -> list[str]:
    lines = ["# Diff Pruning reproduction report", "",
             f"{info['num_runs']} finished run(s) on task(s) {', '.join(info['tasks'])}; methods: "
             f"{', '.join(info['methods'])}. Scores are each task's main dev metric × 100 "
             f"({', '.join(f'{t}: {m}' for t, m in info['main_metrics'].items())}).", "",
             "Run settings (from run_config.json):", ""]
    lines += _table(["setting", "value(s)"], [[k, v] for k, v in info["settings"]], align_first=2)
    if info["capped"]:
        seeds = ("each setting is one seed" if info.get("one_seed", True) else
                 "settings run at several seeds are averaged over them")
        lines += ["", f"**Training sets were capped** (examples kept, per capped task: {info['capped']}) to fit the "
                  f"compute at hand, and {seeds}: absolute scores sit below full-data training and differences "
                  "of a point or two are within noise. The paper's numbers are BERT-large on full GLUE."]
    for note in info["notes"]:
        lines += ["", f"Note: {note}"]
    return lines + [""]


def claims_section(claims: list[dict]) -> list[str]:
    lines = ["## The paper's claims", ""]
    for c in claims:
        lines.append(f"- **{c['status']}** — {c['claim']} (paper: {c['paper']}): {c['evidence']}")
    return lines + [""]


def heatmap_section(h: dict | None, png: str | None) -> list[str]:
    lines = ["## Nonzeros per layer group, per task (Figure 2)", ""]
    if h is None:
        return lines + _missing("needs Diff Pruning runs (diff-pruning or diff-pruning-structured)")
    lines += [f"Diff Pruning setting shown: **{h['variant']} at {fmt_sparsity(h['sparsity'])}** (structured is "
              "preferred, then 0.5%, then the sparsity run on most tasks)."
              + (f" Also run, not shown: {', '.join(f'{v}@{fmt_sparsity(s)}' for v, s in h['other_settings'])}."
                 if h["other_settings"] else "")
              + " Counts of nonzero entries of δ; the task head is trained densely and not part of δ.", ""]
    rows = [[t] + [_n(v) for v in row] for t, row in zip(h["tasks"], h["matrix"])]
    if h["group_params"]:
        rows.append(["(diff-pruned parameters)"] + [_n(h["group_params"].get(g)) for g in h["groups"]])
    lines += _table(["task"] + h["groups"], rows)
    return lines + (["", f"![nonzeros per layer group]({png})"] if png else []) + [""]


def untouched_section(u: dict | None) -> list[str]:
    lines = ["## Parameter groups left entirely at zero (Table 3)", ""]
    if u is None:
        return lines + _missing("needs sparse runs whose diffs list their diff-pruned tensors "
                                "(extra['diff_tensors']): a tensor left at zero is not stored")
    kinds = sorted({k for p in u["pooled"].values() for k in p["by_kind"]})
    lines += ["One group per diff-pruned tensor (weight matrix, bias vector or LayerNorm weight); a group is "
              "untouched when its whole diff is zero. Pooled over tasks: untouched / groups.", ""]
    rows = []
    for key, p in sorted(u["pooled"].items(), key=lambda kv: (kv[1]["variant"], kv[1]["sparsity"] or 0)):
        label = p["variant"] + ("" if p["sparsity"] is None else f"@{fmt_sparsity(p['sparsity'])}")
        if p["sparsity"] is None:
            label = f"**{label} (all sparsities)**"
        cells = [f"{100 * p['share']:.1f}% ({p['untouched']}/{p['groups']})"]
        cells += [f"{100 * p['by_kind'][k][0] / p['by_kind'][k][1]:.1f}% ({p['by_kind'][k][0]}/{p['by_kind'][k][1]})"
                  if k in p["by_kind"] else "–" for k in kinds]
        rows.append([label, str(p["runs"])] + cells)
    plural = {"weight matrix": "weight matrices"}
    lines += _table(["method", "runs", "all groups"] + [plural.get(k, f"{k}s") for k in kinds], rows)
    return lines + [""]


def sparsity_section(sc: dict | None, png: str | None) -> list[str]:
    lines = ["## Dev metric against sparsity (Figure 1 / Table 2)", ""]
    if sc is None:
        return lines + _missing("needs sparse runs (a method with a sparsity, e.g. diff-pruning-structured@0.005)")
    cols = [fmt_sparsity(s) for s in sc["sparsities"]]
    rows = []
    for task in sc["tasks"] + (["**average**"] if len(sc["tasks"]) > 1 else []):
        for v in sc["variants"]:
            values = sc["average"].get(v, {}) if task == "**average**" else sc["values"][v][task]
            if values:
                rows.append([task, v] + [_m(values.get(s)) for s in sc["sparsities"]])
        dense = sc["dense_average"] if task == "**average**" else {v: d.get(task) for v, d in sc["dense"].items()}
        for v, value in sorted(dense.items()):
            if value is not None:
                rows.append([task, f"{v} (dense)"] + [_m(value)] * len(cols))
    lines += ["Dense methods (full finetuning …) have no sparsity; their score is repeated across the row. "
              "Averages only over tasks that have every value.", ""]
    lines += _table(["task", "method"] + cols, rows, align_first=2)
    return lines + (["", f"![dev metric against sparsity]({png})"] if png else []) + [""]


def fixed_mask_section(fm: dict | None) -> list[str]:
    lines = ["## With vs without the fixed-mask phase", ""]
    if fm is None:
        return lines + _missing("needs runs with an l0 phase followed by a fixed-mask phase (Diff Pruning)")
    lines += ["\"Without\" is the model right after the L0 phase with δ already projected onto the L0 ball "
              "(metrics.json phases.l0); \"with\" is after fixed-mask finetuning (final). Paper: 81.4 → 84.9.", ""]
    rows = [[r["task"], f"{r['variant']}@{fmt_sparsity(r['sparsity'])}", _m(r["l0"]), _m(r["final"]),
             f"{100 * r['gain']:+.1f}"] for r in fm["rows"]]
    rows += [[f"**average ({a['tasks']} tasks)**", f"{a['variant']}@{fmt_sparsity(a['sparsity'])}", _m(a["l0"]),
              _m(a["final"]), f"{100 * a['gain']:+.1f}"] for a in fm["averages"]]
    lines += _table(["task", "method", "without (after L0)", "with (final)", "gain"], rows, align_first=2)
    return lines + [""]


def curves_section(cv: dict | None, png: str | None) -> list[str]:
    lines = ["## Expected L0 fraction and task loss during training", ""]
    if cv is None:
        return lines + _missing("needs Diff Pruning runs with a log.jsonl")
    rows = [[c["task"], c["name"], _n(c["expected_l0_frac"][0]) if c["expected_l0_frac"] else "–",
             _n(c["expected_l0_frac"][-1]) if c["expected_l0_frac"] else "–",
             _n(c["task_loss"][-1]) if c["task_loss"] else "–"] for c in cv["curves"]]
    lines += ["E‖δ‖₀/d is logged during the L0 phase; task loss in every phase (dotted line: phase change).", ""]
    head = ["task", "run", "E‖δ‖₀/d first logged", "E‖δ‖₀/d last logged", "last task loss"]
    lines += _table(head, rows, align_first=2)
    return lines + (["", f"![training curves]({png})"] if png else []) + [""]


def storage_section(st: dict | None) -> list[str]:
    lines = ["## Storage per task (Table 6)", ""]
    if st is None:
        return lines + _missing("needs runs whose metrics.json records storage")
    lines += ["Stored bytes = the task diff on disk (tensors + config). Parameters per task = nonzeros + dense "
              "tensors (head included); % of base against the pretrained model without its head. round(t·d): "
              "the nonzeros the target sparsity asks for.", ""]
    rows = [[r["task"], r["name"], _n(r["stored_bytes"]), _n(r["task_params"]),
             "–" if r["task_params_pct"] is None else f"{r['task_params_pct']:.3g}%",
             _n(r["nnz"]) if r["sparsity"] is not None else "– (dense)",
             _n(r["target_nnz"]), _n(r["bytes_per_nnz"])] for r in st["rows"]]
    lines += _table(["task", "method", "stored bytes", "params/task", "% of base", "nonzeros", "round(t·d)",
                     "bytes/nonzero"], rows, 2)
    return lines + [""]


def scores_section(sc: dict | None) -> list[str]:
    lines = ["## Dev scores per run (all metrics)", ""]
    if sc is None:
        return lines + _missing("needs finished runs with final dev metrics")
    for task in sc["tasks"]:
        lines += [f"**{task['task']}** ({task['split']} split; main metric {task['main_metric']}; × 100)", ""]
        rows = [[row["name"], *[_m(row.get(m)) for m in task["metrics"]]] for row in task["rows"]]
        lines += _table(["method", *[m.replace("_", " ") for m in task["metrics"]]], rows) + [""]
    return lines


def render(info: dict, tables: dict, claims: list[dict], pngs: dict[str, str]) -> str:
    lines = header(info) + claims_section(claims)
    lines += heatmap_section(tables["heatmap"], pngs.get("heatmap"))
    lines += untouched_section(tables["untouched"])
    lines += sparsity_section(tables["sparsity"], pngs.get("sparsity"))
    lines += fixed_mask_section(tables["fixed_mask"])
    lines += curves_section(tables["curves"], pngs.get("curves"))
    lines += storage_section(tables["storage"])
    lines += scores_section(tables.get("scores"))
    return "\n".join(lines).rstrip() + "\n"
