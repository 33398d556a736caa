"""What a sparse method's mask is worth on its own: fixed-mask finetuning from δ = 0 on finished runs' masks.

    python benchmarks/mask_quality.py --runs benchmarks/results/grid/runs/cola/s43 --data-dir ../shared/data/glue \
        --out OUT [--workers 2] [--random 1] [--sparsity 0.005]

Diff Pruning and non-adaptive diff pruning differ in how they choose the kept entries (the gates of an L0
phase, or the magnitudes of a dense finetune), but their full pipelines also hand the fixed-mask phase
different starting values and a differently trained head, so comparing their final scores does not say whose
*mask* is better. Here every finished run under `--runs` that stored a sparse diff gives one cell: a
fixed-mask phase on that diff's positions, started from δ = 0 and a newly initialised head, with the run's
task and seed, for the fixed-mask half of the recipe's budget (`epochs` / 2) at the library's fixed-mask
learning rate. `--random N` adds N masks of the same size drawn uniformly from the diff-pruned entries
outside the word embeddings (which hold half of a BERT-base-like model's entries and get a gradient only from
the rows a batch uses), the floor a learned mask has to beat.

Each cell is one process (`mask_quality.py cell …`, which registers the `mask-from-diff` method here, not in
the library, and runs `diffprune train`), one thread each, `--workers` side by side; finished cells are kept,
so a re-run continues. OUT/results.md holds the table: per mask, its run's own final score and the score of
the mask alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import grid  # noqa: E402
import recipe as recipes  # noqa: E402
from diffprune.io import atomic_write_json, atomic_write_text  # noqa: E402
from diffprune.report.collect import is_finished_run, load_run  # noqa: E402

METHOD = "mask-from-diff"


def register_method() -> None:
    """The fixed-mask phase alone, on another run's mask or a random one (values 0, head from scratch)."""
    from diffprune.core.diff_vector import FixedMaskDiff
    from diffprune.errors import DiffpruneError
    from diffprune.methods.base import Method, register
    from diffprune.methods.non_adaptive import SparseFromFinetuneConfig
    from diffprune.methods.sparse import FixedMaskMixin, default_fixed_lr, flat_positions
    from diffprune.sparse_model import layout_for, select_parameters
    from diffprune.storage.format import load_diff

    @dataclass
    class MaskConfig(SparseFromFinetuneConfig):
        mask_from: str = ""    # a stored diff's folder, or "random"
        mask_seed: int = 0     # the random mask's seed

    @register
    class MaskFromDiff(FixedMaskMixin, Method):
        name = METHOD
        config_class = MaskConfig
        phases = ("fixed_mask",)

        def __init__(self, config, model, head_names):
            super().__init__(config, model, head_names)
            self.names = select_parameters(model, head_names, config.include, config.exclude)
            self.layout = layout_for(model, self.names)
            if config.mask_from == "random":
                idx = random_mask(self.layout, config.sparsity, config.mask_seed, input_embedding_names(model))
            else:
                try:
                    idx, _ = flat_positions(load_diff(config.mask_from), self.layout)
                except ValueError as err:
                    raise DiffpruneError(f"{config.mask_from}: {err}") from None
            self.set_fixed_mask(FixedMaskDiff(self.layout, idx))

        def build_phase(self, phase):
            c = self.config
            return self.fixed_mask_phase(c.fixed_lr or default_fixed_lr(c.lr, c.sparsity), c.epochs)


def input_embedding_names(model) -> set[str]:
    """The parameter name(s) of the model's token embedding matrix (Hugging Face's get_input_embeddings)."""
    weight = model.get_input_embeddings().weight
    return {name for name, p in model.named_parameters() if p is weight}


def random_mask(layout, sparsity: float, seed: int, leave_out: set[str]):
    """round(t·d) sorted flat positions, uniform over the entries of every tensor but those in `leave_out`."""
    import torch

    allowed = torch.ones(layout.total, dtype=torch.bool)
    for name, offset, numel in zip(layout.names, layout.offsets, layout.numels):
        if name in leave_out:
            allowed[offset:offset + numel] = False
    pool = allowed.nonzero().squeeze(1)
    count = min(round(sparsity * layout.total), pool.numel())
    pick = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:count]
    return pool[pick].sort().values


@dataclass
class MaskCell:
    run_dir: Path          # this cell's output
    source: str            # the mask: a diff folder or "random"
    label: str
    task: str
    seed: int
    sparsity: float
    own_score: float | None  # the source run's final dev main metric
    mask_seed: int = 0
    after: tuple = ()

    @property
    def done(self) -> bool:
        return is_finished_run(self.run_dir)


def plan(runs_dirs: list[str], out: Path, n_random: int, sparsity: float | None = None) -> list[MaskCell]:
    """The cells of each (task, seed) together: its runs' masks, then its random masks."""
    # every finished run, each seed on its own (the report's `find_runs` folds seeds of a setting together)
    found = {m.parent.resolve() for d in runs_dirs for m in Path(d).rglob("metrics.json")}
    runs = [load_run(r) for r in sorted(found) if is_finished_run(r)]
    groups: dict[tuple, list[MaskCell]] = {}
    for run in runs:
        cfg = run.run_config
        t = (cfg.get("method_options") or {}).get("sparsity")
        if not (run.path / "diff" / "diff.safetensors").is_file() or t is None or sparsity not in (None, t):
            continue  # full finetuning and dense methods have no mask
        task, seed = cfg["task"], int(cfg["seed"])
        own = run.metrics["final"][next(iter(run.metrics["final"]))]["main"]
        source = str((run.path / "diff").resolve())
        groups.setdefault((task, seed, t), []).append(
            MaskCell(out / task / f"s{seed}" / run.label, source, run.label, task, seed, t, own))
    cells = []
    for (task, seed, t), group in groups.items():
        for k in range(n_random):
            label = f"random{k}@{t:g}"
            group.append(MaskCell(out / task / f"s{seed}" / label, "random", label, task, seed, t, None, mask_seed=k))
        cells += group
    return cells


def command(cell: MaskCell, recipe: dict, data_dir: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "cell", "train", "--task", cell.task,
           "--data-dir", data_dir, "--method", METHOD, "--output-dir", str(cell.run_dir), "--seed", str(cell.seed),
           "--no-progress", "--logging-steps", "20", *recipes.common_flags(recipe, cell.task),
           "--set", f"epochs={recipe['epochs'] / 2}", "--set", f"sparsity={cell.sparsity}",
           "--set", f"mask_from={json.dumps(cell.source)}", "--set", f"mask_seed={cell.mask_seed}"]
    return cmd + (["--resume"] if cell.run_dir.exists() else [])


def table(cells: list[MaskCell], recipe: dict) -> tuple[str, list[dict]]:
    rows = []
    for c in cells:
        alone = load_run(c.run_dir).metrics["final"] if c.done else None
        score = alone[next(iter(alone))]["main"] if alone else None
        rows.append({"task": c.task, "seed": c.seed, "mask": c.label, "own_run": c.own_score, "mask_alone": score})
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Fixed-mask phase alone from δ = 0 and a new head, {recipe['epochs'] / 2} epochs, model "
             f"{recipe['model']}, batch {recipe['batch_size']}, length {recipe['max_length']}.", "",
             "| task | seed | mask from | that run's own score | mask alone |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['seed']} | {r['mask']} | {pct(r['own_run'])} | {pct(r['mask_alone'])} |"
              for r in rows]
    return "\n".join(lines) + "\n", rows


def main() -> int:
    if sys.argv[1:2] == ["cell"]:
        register_method()
        from diffprune import cli

        return cli.main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", action="append", required=True, help="a folder of finished runs; repeatable")
    p.add_argument("--data-dir", default="../shared/data/glue")
    p.add_argument("--out", default="benchmarks/out/mask_quality")
    p.add_argument("--recipe", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--random", type=int, default=1, help="random masks per task, seed and sparsity")
    p.add_argument("--sparsity", type=float, default=None, help="only the runs at this sparsity (default: all)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    recipe = recipes.load(args.recipe)
    out = Path(args.out)
    missing = [d for d in args.runs if not Path(d).is_dir()]
    if missing:
        p.error(f"--runs {missing[0]}: not a folder")
    cells = plan(args.runs, out, args.random, args.sparsity)
    if not cells:
        p.error(f"no finished run with a sparse diff under {', '.join(args.runs)}")
    pending = [c for c in cells if not c.done]
    print(f"{len(cells)} cells, {len(pending)} to run in {out}", flush=True)
    if args.dry_run:
        return grid.print_commands(pending, lambda c: command(c, recipe, args.data_dir))
    out.mkdir(parents=True, exist_ok=True)

    def on_done() -> str:
        text, rows = table(cells, recipe)
        atomic_write_text(out / "results.md", text)
        atomic_write_json(out / "results.json", rows)
        return text

    failed = grid.run_cells(pending, lambda c: command(c, recipe, args.data_dir), args.workers, grid.bench_env(),
                            on_done)
    print(on_done())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
