"""The Diff Pruning benchmark grid of benchmarks/recipe.json: methods × tasks × seeds, plus a sparsity curve.

    python benchmarks/grid.py --data-dir ../shared/data/glue --out OUT [--workers 2] [--only TASK,...]
                              [--first LABEL,...] [--keep OLD/results.json] [--archive DIR]

Cells, all at the recipe's budget and with the library's defaults:
* every `grid_methods` entry on every task with the recipe's seed, and again with each `extra_seeds` seed
  on the tasks listed for it; sparse methods at the recipe's `sparsity`;
* the `curve`: its method at each of its sparsities on every task, from the L0 state of the main run at
  `sparsity` (`from_l0`: the L0 phase is trained once per task, only the fixed-mask phase per sparsity).

Each cell is one `diffprune train` process with OMP_NUM_THREADS=1 in OUT/<task>/s<seed>/<label>/, `--workers`
of them side by side (one per core beats one two-thread process on 2 cores). A finished cell (metrics.json)
is skipped and an interrupted one resumed, so re-running continues where it stopped; a cell that another
process is running is waited for, not started twice. `--first` runs the main cells of the given methods (on
every task) before the rest, to have those methods across all tasks early. OUT/results.md and
OUT/results.json are rewritten after every finished cell. `--keep` carries the rows of an earlier grid whose
run folders are gone (a new machine) into this one: those cells are not run again. `--archive DIR` keeps a
light copy of every finished cell under DIR (what `diffprune report` reads: metrics, config, training log, the
diff when it is small; no checkpoints, snapshots or L0 state), so the report can be rebuilt after the machine is
gone; with `--dry-run` it archives what has finished and runs nothing. Prints what it runs and the table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import recipe as recipes  # noqa: E402
from diffprune.compare import ALIASES  # noqa: E402
from diffprune.io import atomic_write_json, atomic_write_text  # noqa: E402
from diffprune.report.collect import is_finished_run, load_run  # noqa: E402
from diffprune.train.rundir import LOCK_NAME  # noqa: E402
from diffprune.methods import get_method  # noqa: E402


@dataclass
class Cell:
    task: str
    seed: int
    label: str
    run_dir: Path
    method: str
    options: dict
    after: list[Path] = field(default_factory=list)  # run directories that must finish first
    kept: dict | None = None  # its row from an earlier grid's results.json (`--keep`): not run again

    @property
    def done(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()


def resolve(label: str) -> tuple[str, dict]:
    method, options = ALIASES.get(label, (label, {}))
    get_method(method)
    return method, dict(options)


def cells(recipe: dict, out: Path, only: set[str] | None) -> list[Cell]:
    tasks = [t for t in recipe["tasks"] if not only or t in only]
    sparsity, seed, epochs = recipe["sparsity"], int(recipe["seed"]), float(recipe["epochs"])
    curve = recipe.get("curve") or {}

    def cell(task, seed, label, extra=None, tag=None, after=()):
        method, options = resolve(label)
        cls = get_method(method)
        options.update(cls.budget(epochs))
        if "sparsity" in {f for f in cls.config_class.__dataclass_fields__}:
            options["sparsity"] = sparsity
        options.update(recipe.get("method_options", {}).get(label, {}))
        options.update(extra or {})
        name = tag or (f"{label}@{options['sparsity']:g}" if "sparsity" in options else label)
        return Cell(task, seed, name, out / task / f"s{seed}" / name, method, options, list(after))

    main, later = [], []
    for task in tasks:
        for label in recipe["grid_methods"]:
            keep = {"keep_l0_state": True} if label == curve.get("method") else None
            main.append(cell(task, seed, label, keep))
    for task in tasks:
        if not curve:
            break
        source = next(c for c in main if c.task == task and c.options.get("keep_l0_state"))
        for s in curve["sparsities"]:
            later.append(cell(task, seed, curve["method"], {"sparsity": s, "from_l0": str(source.run_dir)},
                              after=[source.run_dir]))
    for extra_seed, extra_tasks in recipe.get("extra_seeds", {}).items():
        for task in (t for t in extra_tasks if t in tasks):
            later += [cell(task, int(extra_seed), label) for label in recipe["grid_methods"]]
    return main + later


def command(cell: Cell, recipe: dict, data_dir: str) -> list[str]:
    cmd = [sys.executable, "-m", "diffprune", "train", "--task", cell.task, "--data-dir", data_dir,
           "--method", cell.method, "--output-dir", str(cell.run_dir), "--seed", str(cell.seed),
           "--no-progress", "--logging-steps", "20", *recipes.common_flags(recipe, cell.task)]
    for key, value in cell.options.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd + (["--resume"] if cell.run_dir.exists() else [])


def summary(cell: Cell) -> dict | None:
    if not is_finished_run(cell.run_dir):
        return cell.kept
    m = load_run(cell.run_dir).metrics
    phases = m["phases"]
    first = next(iter(phases.values()))
    return {"task": cell.task, "seed": cell.seed, "label": cell.label, "main_metric": m["main_metric"],
            "dev": next(iter(m["final"].values())),
            "after_first_phase": first.get("dev", {}).get("main") if len(phases) > 1 else None,
            "nonzero_before_projection": first["train"].get("nonzero_frac") if "l0" in phases else None,
            "stored_bytes": m.get("storage", {}).get("stored_bytes"),
            "minutes": round(sum(p["train"]["seconds"] for p in phases.values()) / 60, 1),
            "steps": sum(p["train"]["steps"] for p in phases.values())}


def table(rows: list[dict], recipe: dict) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Budget: {recipe['epochs']} epochs per method (two-phase methods split them), batch "
             f"{recipe['batch_size']}, length {recipe['max_length']}, model {recipe['model']}, training sets "
             f"capped at {recipe.get('max_train_samples') or 'nothing'}; library defaults otherwise.", "",
             "| task | seed | run | main | vs full | dev metrics | after phase 1 | nonzero before projection | "
             "stored bytes | steps | min |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    full = {(r["task"], r["seed"]): r["dev"]["main"] for r in rows if r["label"] == "full"}
    for r in rows:
        dev = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["dev"].items() if k not in ("loss", "main"))
        nz = r["nonzero_before_projection"]
        ref = full.get((r["task"], r["seed"]))
        gap = "" if ref is None or r["label"] == "full" else f"{100 * (r['dev']['main'] - ref):+.1f}"
        lines.append(f"| {r['task']} | {r['seed']} | {r['label']} | {pct(r['dev']['main'])} | {gap} | {dev} | "
                     f"{pct(r['after_first_phase'])} | {'' if nz is None else f'{100 * nz:.3f}%'} | "
                     f"{r['stored_bytes'] or 0:,} | {r['steps']} | {r['minutes']} |")
    lines += ["", "Average of the main metric over the tasks that every method finished, per seed:", ""]
    by = {}
    for r in rows:
        by.setdefault((r["seed"], r["label"]), {})[r["task"]] = r["dev"]["main"]
    for seed in sorted({s for s, _ in by}):
        labels = [lab for s, lab in by if s == seed]
        common = set.intersection(*(set(by[(seed, lab)]) for lab in labels))
        if not common:
            continue
        lines.append(f"- seed {seed}, {len(common)} task(s) ({', '.join(sorted(common))}): " + "; ".join(
            f"{lab} {100 * sum(by[(seed, lab)][t] for t in common) / len(common):.1f}" for lab in labels))
    return "\n".join(lines + seed_means(by)) + "\n"


def seed_means(by: dict) -> list[str]:
    """Per-task means over the seeds, for the runs every seed has, on the tasks where all of them finished,
    with each task's spread between seeds (largest minus smallest): one seed's gap is only worth reading
    against how far two seeds of the same run fall apart."""
    seeds = sorted({s for s, _ in by})
    labels = [lab for lab in dict.fromkeys(lab for _, lab in by) if all((s, lab) in by for s in seeds)]
    if len(seeds) < 2 or not labels:
        return []
    tasks = [t for t in by[(seeds[0], labels[0])] if all(t in by[(s, lab)] for s in seeds for lab in labels)]
    if not tasks:
        return []
    out = ["", f"Mean over seeds {', '.join(map(str, seeds))} (in brackets: the spread between the seeds), on "
                f"the tasks every seed finished for each run below:", "",
           "| run | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    for lab in labels:
        cells, means = [], []
        for t in tasks:
            values = [100 * by[(s, lab)][t] for s in seeds]
            means.append(sum(values) / len(values))
            cells.append(f"{means[-1]:.1f} ({max(values) - min(values):.1f})")
        out.append(f"| {lab} | " + " | ".join(cells) + f" | {sum(means) / len(means):.1f} |")
    return out


ARCHIVE_SKIP = {LOCK_NAME, "checkpoints", "snapshot", "l0_state"}
ARCHIVE_MAX_BYTES = 8 << 20  # a full run's dense "diff" (a whole model) stays behind; its metrics do not


def archive(cells_: list[Cell], out: Path, dest: Path) -> int:
    """Light copies of the finished cells not yet under `dest` (same relative path as under `out`); each is
    written to a temporary folder and renamed, so an archived cell is whole. Returns how many were added."""
    added = 0
    for c in cells_:
        target = dest / c.run_dir.relative_to(out)
        if target.exists() or not is_finished_run(c.run_dir):
            continue
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for src in sorted(c.run_dir.rglob("*")):
            rel = src.relative_to(c.run_dir)
            if src.is_dir() or ARCHIVE_SKIP & set(rel.parts) or src.stat().st_size > ARCHIVE_MAX_BYTES:
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / rel)
        tmp.rename(target)
        added += 1
    return added


def write_results(all_cells: list[Cell], recipe: dict, out: Path) -> str:
    rows = [r for r in map(summary, all_cells) if r]
    text = table(rows, recipe)
    atomic_write_text(out / "results.md", text)
    atomic_write_json(out / "results.json", rows)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/glue")
    p.add_argument("--out", default="benchmarks/out/grid")
    p.add_argument("--recipe", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated tasks")
    p.add_argument("--first", default="", help="comma-separated grid methods whose main cells run first")
    p.add_argument("--keep", action="append", default=[], metavar="RESULTS_JSON",
                   help="an earlier grid's results.json (same recipe): its cells count as done and its rows "
                        "stay in the tables (for a grid whose run folders are gone); repeatable")
    p.add_argument("--archive", type=Path, default=None, metavar="DIR",
                   help="keep a light copy of every finished cell under DIR (for `diffprune report` later)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    recipe = recipes.load(args.recipe)
    out = Path(args.out)
    todo = cells(recipe, out, set(filter(None, args.only.split(","))))
    try:
        keep_rows(todo, args.keep)
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--keep: {e}")
    out.mkdir(parents=True, exist_ok=True)
    env = bench_env()
    pending = [c for c in todo if not c.done and not c.kept]
    first = [label for label in args.first.split(",") if label]
    unknown = sorted(set(first) - set(recipe["grid_methods"]))
    if unknown:
        p.error(f"--first {','.join(unknown)}: not in the recipe's grid_methods {recipe['grid_methods']}")
    early = [c for c in pending if not c.after and c.seed == int(recipe["seed"]) and
             any(c.label.split("@")[0] == label for label in first)]
    pending = early + [c for c in pending if c not in early]
    print(f"{len(todo)} cells, {len(todo) - len(pending)} done, {len(pending)} to run in {out}", flush=True)
    if args.archive is not None:
        args.archive.mkdir(parents=True, exist_ok=True)
        print(f"archived {archive(todo, out, args.archive)} finished cell(s) into {args.archive}", flush=True)
    if args.dry_run:
        return print_commands(pending, lambda c: command(c, recipe, args.data_dir))
    def on_done() -> str:
        if args.archive is not None:
            archive(todo, out, args.archive)
        return write_results(todo, recipe, out)

    failed = run_cells(pending, lambda c: command(c, recipe, args.data_dir), args.workers, env, on_done)
    print(on_done())
    return 1 if failed else 0


def keep_rows(todo: list[Cell], files: list[str]) -> None:
    """Attach to each cell its row from the `--keep` files (the last file wins), so it is not run again. A
    kept cell whose L0 state a pending curve cell needs (`from_l0`) and whose run folder is gone runs again:
    a row cannot stand in for the state."""
    rows = {}
    for name in files:
        data = json.loads(Path(name).read_text())
        if not isinstance(data, list):
            raise ValueError(f"{name} is not a grid's results.json (a list of rows)")
        rows.update({(r["task"], int(r["seed"]), r["label"]): r for r in data})
    for c in todo:
        c.kept = rows.get((c.task, c.seed, c.label))
    needed = {a for c in todo if not c.done and not c.kept for a in c.after}
    for c in todo:
        if c.run_dir in needed and not c.done:
            c.kept = None


def print_commands(pending: list, make_command) -> int:
    """`--dry-run` of every grid-like script: each pending cell's command line, runnable as printed."""
    for c in pending:
        print(" ".join(make_command(c)))
    return 0


def bench_env() -> dict:
    """One thread per process, offline, and glibc's allocator settings of the README's speed note (big tensors
    are not mapped afresh every step)."""
    return {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000", **os.environ,
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run's lock (`diffprune train` holds it while it runs): a cell left
    running by a grid that was stopped without its children, or started by hand."""
    import fcntl

    path = run_dir / LOCK_NAME
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while an exclusive lock is held
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the shared lock if it was taken
    return False


def run_cells(pending: list, make_command, workers: int, env: dict, on_done) -> set[Path]:
    """Run `pending` cells as `workers` side-by-side processes, each after the runs in its `after`; calls
    `on_done()` after every finished cell (the results tables). A cell that another process is running
    (`held_elsewhere`) takes a worker's slot and is waited for, then counted done or resumed. Returns the run
    directories that failed."""
    pending = list(pending)
    running: dict[subprocess.Popen, tuple[Cell, float]] = {}
    failed: set[Path] = set()
    elsewhere: set[Path] = set()
    while pending or running or elsewhere:
        for c in [c for c in pending if c.run_dir in elsewhere and not held_elsewhere(c.run_dir)]:
            elsewhere.discard(c.run_dir)
            if c.done:
                pending.remove(c)
                print(f"done {c.run_dir} (in another process)", flush=True)
                on_done()
        started = {c.run_dir for c, _ in running.values()}
        for c in pending:  # all of them before starting any: each one held takes a slot
            if c.run_dir not in elsewhere and c.run_dir not in started and held_elsewhere(c.run_dir):
                elsewhere.add(c.run_dir)
                print(f"wait {c.run_dir}: another process is running it", flush=True)
        for c in list(pending):
            if c.run_dir in elsewhere:
                continue
            if len(running) + len(elsewhere) >= workers:
                break
            if any(a in failed for a in c.after):
                pending.remove(c)
                failed.add(c.run_dir)
                print(f"skip {c.run_dir}: a run it needs failed", flush=True)
            elif all((a / "metrics.json").is_file() for a in c.after):
                pending.remove(c)
                c.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(c.run_dir.parent / f"{c.label}.log", "a")
                running[subprocess.Popen(make_command(c), stdout=log, stderr=log, env=env)] = (c, time.time())
                print(f"start {c.run_dir}", flush=True)
        time.sleep(5)
        for proc in [q for q in running if q.poll() is not None]:
            c, started = running.pop(proc)
            status = "done" if proc.returncode == 0 and c.done else f"FAILED (exit {proc.returncode})"
            if status != "done":
                failed.add(c.run_dir)
            print(f"{status} {c.run_dir} in {(time.time() - started) / 60:.1f} min", flush=True)
            on_done()
        if not running and not elsewhere and pending and all(any(not (a / "metrics.json").is_file() for a in c.after)
                                           for c in pending):
            print("the remaining cells wait for runs that did not finish", flush=True)
            break
    return failed


if __name__ == "__main__":
    sys.exit(main())
