"""The numbers behind each section of the report, computed from the runs (no formatting, no plotting).

Every function returns plain data (dicts and lists, JSON-serialisable) or None when the runs do not hold
what it needs; `markdown.py` and `figures.py` only present these values, and report.json stores them.
Metric values are as recorded (fractions); the presentation multiplies by 100.

Sections follow Guo, Rush & Kim (ACL 2021): Figure 2 (nonzeros per layer per task), Table 3 (parameter
groups left entirely at zero), Figure 1 / Table 2 (dev metric against sparsity), the fixed-mask ablation
(84.9 vs 81.4 dev average), and Table 6 (storage per task).
"""
from __future__ import annotations

from collections import Counter
from statistics import mean

from .collect import DP_VARIANTS, Run, group_kind, group_order

PAPER_SPARSITY = 0.005  # the paper's main setting (0.5%); preferred wherever one sparsity must be chosen


def _tasks(runs: list[Run]) -> list[str]:
    return sorted({r.task for r in runs})


def pick_dp_setting(runs: list[Run]) -> tuple[str, float] | None:
    """The Diff Pruning (variant, sparsity) shown where one is needed: structured first, then 0.5% if run,
    else the sparsity run on most tasks (the larger on a tie)."""
    for variant in DP_VARIANTS:
        counts = Counter(r.sparsity for r in runs if r.variant == variant and r.sparsity is not None)
        if counts:
            if PAPER_SPARSITY in counts:
                return variant, PAPER_SPARSITY
            return variant, max(counts, key=lambda t: (counts[t], t))
    return None


def nnz_heatmap(runs: list[Run]) -> dict | None:
    """Figure 2: nonzeros of δ per layer group (rows: tasks), from `diff_stats(...)["nnz_by_layer"]`.

    Columns are every group of the diff-pruned tensors (from extra["diff_tensors"] when recorded, so a layer
    left entirely at zero still shows as 0). The task head is trained densely and is not part of δ.
    """
    setting = pick_dp_setting(runs)
    if setting is None:
        return None
    variant, sparsity = setting
    chosen = sorted((r for r in runs if (r.variant, r.sparsity) == setting), key=lambda r: r.task)
    by_task = {r.task: r.stats["nnz_by_layer"] for r in chosen}
    groups = set().union(*by_task.values(), *(r.group_numel() for r in chosen))
    groups = sorted(groups, key=group_order)
    sizes: dict[str, int] = {}
    for r in chosen:
        for g, n in r.group_numel().items():
            sizes.setdefault(g, n)
    return {"variant": variant, "sparsity": sparsity, "tasks": list(by_task), "groups": groups,
            "matrix": [[int(by_task[t].get(g, 0)) for g in groups] for t in by_task], "group_params": sizes,
            "other_settings": sorted({(r.variant, r.sparsity) for r in runs
                                      if r.variant in DP_VARIANTS and (r.variant, r.sparsity) != setting},
                                     key=lambda vs: (vs[0], vs[1] or 0))}


def untouched_groups(runs: list[Run]) -> dict | None:
    """Table 3: share of parameter groups (one per diff-pruned tensor) whose diff is entirely zero.

    A group is untouched when the diff lists it as diff-pruned (extra["diff_tensors"], or the older
    extra["diff_param_names"]) and the stored diff has no nonzero in it.
    Rows per run; totals per (variant, sparsity) and per variant, pooled over tasks (untouched / groups).
    """
    rows = []
    for r in runs:
        tensors = r.diff_tensor_names
        if r.sparsity is None or not tensors:
            continue
        nnz = {name: delta.nnz for name, delta in r.diff.sparse.items()}
        kinds: dict[str, list[int]] = {}
        for name in tensors:
            counts = kinds.setdefault(group_kind(name), [0, 0])
            counts[0] += int(nnz.get(name, 0) == 0)
            counts[1] += 1
        untouched = sum(c[0] for c in kinds.values())
        rows.append({"task": r.task, "variant": r.variant, "sparsity": r.sparsity, "groups": len(tensors),
                     "untouched": untouched, "share": untouched / len(tensors), "by_kind": kinds})
    if not rows:
        return None
    pooled: dict[str, dict] = {}
    for row in rows:
        for key in (row["variant"], f"{row['variant']}@{row['sparsity']:g}"):
            p = pooled.setdefault(key, {"variant": row["variant"], "sparsity": None if key == row["variant"]
                                        else row["sparsity"], "runs": 0, "groups": 0, "untouched": 0,
                                        "by_kind": {}})
            p["runs"] += 1
            p["groups"] += row["groups"]
            p["untouched"] += row["untouched"]
            for kind, (u, n) in row["by_kind"].items():
                k = p["by_kind"].setdefault(kind, [0, 0])
                k[0] += u
                k[1] += n
    for p in pooled.values():
        p["share"] = p["untouched"] / p["groups"]
    return {"rows": rows, "pooled": pooled}


def sparsity_curve(runs: list[Run]) -> dict | None:
    """Figure 1 / Table 2: dev main metric per task for every sparse variant at every sparsity, and the
    dense methods (full finetuning drawn as the reference line); averages over the tasks that have them all."""
    sparse = [r for r in runs if r.sparsity is not None and r.dev_main is not None]
    if not sparse:
        return None
    tasks = _tasks(runs)
    sparsities = sorted({r.sparsity for r in sparse})
    variants = sorted({r.variant for r in sparse}, key=lambda v: (v not in DP_VARIANTS, v))
    values = {v: {t: {} for t in tasks} for v in variants}
    for r in sparse:
        values[r.variant][r.task][r.sparsity] = r.dev_main
    dense: dict[str, dict[str, float]] = {}
    for r in runs:
        if r.sparsity is None and r.dev_main is not None:
            dense.setdefault(r.variant, {})[r.task] = r.dev_main
    average = {}
    for v in variants:
        for s in sparsities:
            got = [values[v][t][s] for t in tasks if s in values[v][t]]
            if len(got) == len(tasks):
                average.setdefault(v, {})[s] = mean(got)
    dense_average = {v: mean(d.values()) for v, d in dense.items() if len(d) == len(tasks)}
    metric = {r.task: r.metrics.get("main_metric", "main") for r in runs}
    return {"tasks": tasks, "sparsities": sparsities, "variants": variants, "values": values, "dense": dense,
            "average": average, "dense_average": dense_average, "main_metric": metric}


def fixed_mask_ablation(runs: list[Run]) -> dict | None:
    """With vs without the fixed-mask phase: dev main after the L0 phase (δ already projected onto the
    L0 ball, phases.l0 of metrics.json) against the final one, per run; averages per (variant, sparsity)."""
    rows = []
    for r in runs:
        before, after = r.phase_main("l0"), r.dev_main
        if before is None or after is None or list(r.metrics.get("phases", {}))[-1] == "l0":
            continue
        rows.append({"task": r.task, "variant": r.variant, "sparsity": r.sparsity, "l0": before,
                     "final": after, "gain": after - before})
    if not rows:
        return None
    rows.sort(key=lambda row: (row["variant"], row["sparsity"] or 0, row["task"]))
    averages = {}
    for row in rows:
        averages.setdefault((row["variant"], row["sparsity"]), []).append(row)
    return {"rows": rows, "averages": [{"variant": v, "sparsity": s, "tasks": len(rs),
                                        "l0": mean(x["l0"] for x in rs), "final": mean(x["final"] for x in rs),
                                        "gain": mean(x["gain"] for x in rs)} for (v, s), rs in averages.items()]}


def training_curves(runs: list[Run]) -> dict | None:
    """Expected L0 fraction (L0 phase) and task loss (every phase) against the step, for Diff Pruning runs.

    Steps restart in each phase of log.jsonl; they are made continuous by adding the step count of the
    phases before (from metrics.json, else the last step logged)."""
    curves = []
    for r in runs:
        if r.variant not in DP_VARIANTS:
            continue
        records = r.log_records()
        if not records:
            continue
        offset, ends = 0, []
        series = {"step": [], "task_loss": [], "l0_step": [], "expected_l0_frac": []}
        for phase in r.metrics.get("phases", {}):
            mine = sorted((x for x in records if x.get("phase") == phase), key=lambda x: x.get("step") or 0)
            for x in mine:
                step = offset + int(x.get("step") or 0)
                loss = x.get("task_loss", x.get("loss"))
                if isinstance(loss, (int, float)):
                    series["step"].append(step)
                    series["task_loss"].append(float(loss))
                if isinstance(x.get("expected_l0_frac"), (int, float)):
                    series["l0_step"].append(step)
                    series["expected_l0_frac"].append(float(x["expected_l0_frac"]))
            steps = r.metrics["phases"][phase].get("train", {}).get("steps")
            offset += int(steps) if steps else max((int(x.get("step") or 0) for x in mine), default=0)
            ends.append(offset)
        curves.append({"task": r.task, "variant": r.variant, "sparsity": r.sparsity, "name": r.name,
                       "phase_ends": ends[:-1], **series})
    return {"curves": curves, "tasks": sorted({c["task"] for c in curves})} if curves else None


def storage_table(runs: list[Run]) -> dict | None:
    """Table 6: what each method stores per task (bytes, parameters, % of the base), and for sparse runs
    the nonzeros against t·d (d = diff-pruned parameters, t the target sparsity)."""
    rows = []
    for r in runs:
        st = r.storage
        if st.get("stored_bytes") is None:
            continue
        d, t = st.get("num_diff_params"), r.sparsity
        rows.append({"task": r.task, "name": r.name, "variant": r.variant, "sparsity": t,
                     "stored_bytes": st["stored_bytes"], "task_params": st.get("task_params"),
                     "task_params_pct": st.get("task_params_pct"), "nnz": st.get("nnz"), "d": d,
                     "target_nnz": round(t * d) if t is not None and d else None,
                     "bytes_per_nnz": st.get("sparse_bytes_per_nnz"), "dense_params": st.get("dense_params")})
    if not rows:
        return None
    rows.sort(key=lambda row: (row["task"], row["sparsity"] is not None, row["variant"], row["sparsity"] or 0))
    return {"rows": rows}


def scores_table(runs: list[Run]) -> dict | None:
    """Every final dev metric of every run, per task (QA runs: exact match and F1; MRPC: F1 and accuracy),
    so a task judged by more than its main metric shows all of them."""
    per_task: dict[str, dict] = {}
    for r in runs:
        splits = {k: v for k, v in (r.metrics.get("final") or {}).items() if isinstance(v, dict)}
        if not splits:
            continue
        split, values = next(iter(splits.items()))
        metrics = [k for k, v in values.items() if k not in ("loss", "main") and isinstance(v, (int, float))]
        task = per_task.setdefault(r.task, {"task": r.task, "split": split, "main_metric":
                                            r.metrics.get("main_metric"), "metrics": [], "rows": []})
        task["metrics"] += [m for m in metrics if m not in task["metrics"]]
        task["rows"].append({"name": r.name, **{m: values[m] for m in metrics}})
    for task in per_task.values():
        task["rows"].sort(key=lambda row: row["name"])
    return {"tasks": [per_task[t] for t in sorted(per_task)]} if per_task else None


def build_tables(runs: list[Run]) -> dict:
    return {"heatmap": nnz_heatmap(runs), "untouched": untouched_groups(runs), "sparsity": sparsity_curve(runs),
            "fixed_mask": fixed_mask_ablation(runs), "curves": training_curves(runs),
            "storage": storage_table(runs), "scores": scores_table(runs)}
