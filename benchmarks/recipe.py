"""Read benchmarks/recipe.json, the budgets and settings every benchmark script shares.

    python benchmarks/recipe.py get epochs          # one value (lists space-separated, dicts as JSON)
    python benchmarks/recipe.py common TASK         # the `diffprune train` flags of the budget for TASK
    python benchmarks/recipe.py sets METHOD,...     # `--set METHOD.key=value` flags of method_options

RECIPE=path overrides the file. grid.py imports `load` and `common_flags`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT = Path(__file__).with_name("recipe.json")


def load(path: str | os.PathLike | None = None) -> dict:
    return json.loads(Path(path or os.environ.get("RECIPE") or DEFAULT).read_text())


def common_flags(recipe: dict, task: str) -> list[str]:
    """Model, batch size, length and the task's training-set cap (seed and epochs are per run)."""
    flags = ["--model", recipe["model"], "--batch-size", str(recipe["batch_size"]),
             "--max-length", str(recipe["max_length"])]
    cap = recipe.get("max_train_samples", {}).get(task)
    return flags + (["--max-train-samples", str(cap)] if cap else [])


def set_flags(recipe: dict, methods: list[str]) -> list[str]:
    out = []
    for method in methods:
        for key, value in recipe.get("method_options", {}).get(method, {}).items():
            out += ["--set", f"{method}.{key}={json.dumps(value)}"]
    return out


def main(argv: list[str]) -> int:
    recipe = load()
    if len(argv) == 2 and argv[0] == "get":
        value = recipe[argv[1]]
        print(" ".join(map(str, value)) if isinstance(value, list) else
              json.dumps(value) if isinstance(value, dict) else value)
    elif len(argv) == 2 and argv[0] == "common":
        print(" ".join(common_flags(recipe, argv[1])))
    elif len(argv) == 2 and argv[0] == "sets":
        print(" ".join(set_flags(recipe, argv[1].split(","))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
