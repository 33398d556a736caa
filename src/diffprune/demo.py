"""The offline demo: structured Diff Pruning at 0.5% on the embedded MiniLM, a few minutes on 2 cores.

    make demo                         # = python -m diffprune.demo --output-dir demo-out

The data is NOT a benchmark: it is a small synthetic sentiment task that diffprune writes itself from
templates and word lists (`diffprune.tasks.demo_data`), so the demo needs no network and no download.
For real GLUE data, run the same training with `--task rte --data-dir path/to/glue` (see the README).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import DiffpruneError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffprune.demo", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="demo-out")
    p.add_argument("--model", default="minilm")
    p.add_argument("--sparsity", type=float, default=0.005)
    p.add_argument("--epochs", type=float, default=3.0, help="epochs of each phase")
    args = p.parse_args(argv)

    from .api import train
    from .cli import print_summary
    from .tasks import custom_task, write_demo_data

    out = Path(args.output_dir)
    try:
        data_dir = write_demo_data(out / "data")
        spec = custom_task(str(data_dir / "train.tsv"), str(data_dir / "dev.tsv"), ["sentence"], "label",
                           name="demo-sentiment")
        print(f"demo: structured Diff Pruning at {100 * args.sparsity:g}% on '{args.model}', "
              f"synthetic sentiment data in {data_dir}")
        metrics = train(output_dir=str(out / "run"), task=spec.name, model=args.model, method="diff-pruning",
                        spec=spec, overwrite=True, max_length=32, logging_steps=10,
                        method_options=dict(structured=True, sparsity=args.sparsity, l0_epochs=args.epochs,
                                            epochs=args.epochs, lr=5e-4, head_lr=1e-3, fixed_lr=5e-4))
    except DiffpruneError as exc:
        print(f"diffprune: error: {exc}", file=sys.stderr)
        return 2
    print_summary(str(out / "run"), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
