"""The Python entry points: train a task diff, load a base model with a task diff applied.

    import diffprune
    metrics = diffprune.train(task="rte", data_dir="glue", method="diff-pruning",
                              output_dir="runs/rte", structured=True, sparsity=0.005)
    model, tokenizer, diff = diffprune.load_task_model("runs/rte")   # base + sparse diff, ready to predict
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DiffpruneError
from .methods import get_method
from .models import load_model
from .storage import TaskDiff, apply_diff, load_diff


def train(output_dir: str, task: str = "rte", model: str = "minilm", method: str = "diff-pruning",
          spec=None, **options: Any) -> dict:
    """Run the training pipeline. Keyword options go to `TrainConfig` or, if not one of its fields,
    to the method's config (e.g. `sparsity`, `structured`, `l0_lambda`). Without `max_length`, the task
    kind's default applies (128 tokens; 384 per window for question answering)."""
    import dataclasses

    from .train.pipeline import TrainConfig, run

    recipe_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = {k: v for k, v in options.items() if k in recipe_fields}
    if recipe.get("max_length") is None:  # the task kind's default, as on the command line (QA: 384)
        from .tasks import get_task, task_kind

        recipe["max_length"] = task_kind(spec or get_task(task)).default_max_length
    method_options = {k: v for k, v in options.items() if k not in recipe_fields}
    cfg = TrainConfig(output_dir=output_dir, task=task, model=model, method=method,
                      method_options={**recipe.pop("method_options", {}), **method_options}, **recipe)
    return run(cfg, spec)


def find_diff_dir(path: str | Path) -> Path:
    """Accept a run directory (holding `diff/`) or a diff directory itself."""
    path = Path(path)
    if (path / "diff" / "diff_config.json").exists():
        return path / "diff"
    if (path / "diff_config.json").exists():
        return path
    if not path.exists():
        raise DiffpruneError(f"no such run or diff directory: {path}")
    raise DiffpruneError(f"{path} holds no task diff (expected {path}/diff/diff_config.json or "
                         f"{path}/diff_config.json); is the run finished?")


def diff_kind(diff: TaskDiff) -> str:
    """The task kind a diff was trained for ("classification" for diffs written before QA existed)."""
    return str(diff.extra.get("task_kind", "classification"))


def check_diff_task(diff: TaskDiff, spec, where) -> list[str]:
    """Refuse a diff of the wrong kind for `spec` (classification vs regression vs question answering, label
    count); return warnings for a diff trained on another task."""
    def describe(kind, labels):
        if kind == "qa":
            return "question-answering"
        return "regression" if labels is None else f"{len(labels)}-class classification"

    kind = describe(diff_kind(diff), diff.label_names)
    want = describe(spec.kind, spec.label_names)
    if kind != want:
        raise DiffpruneError(f"{where} holds a {kind} diff (task '{diff.task}'), but task '{spec.name}' is "
                             f"{want}; evaluate it on a task of its kind")
    return [f"{where} was trained on task '{diff.task}', not '{spec.name}'"] if diff.task != spec.name else []


def load_base_for_diff(path, base_model: str | None = None, diff: TaskDiff | None = None):
    """(model, tokenizer, diff): the base model of the diff's task kind and head size, nothing applied yet."""
    from .tasks import task_kind

    diff = diff if diff is not None else load_diff(find_diff_dir(path))
    kind = task_kind(diff_kind(diff))
    num_labels = 2 if kind.name == "qa" else len(diff.label_names) if diff.label_names else 1
    model, tokenizer, _ = load_model(base_model or diff.base_model, num_labels, diff.label_names,
                                     auto_class=kind.auto_class)
    return model, tokenizer, diff


def load_task_model(path: str | Path, base_model: str | None = None, check_fingerprint: bool = True,
                    diff: TaskDiff | None = None):
    """(model, tokenizer, diff): the base model named in the diff (or `base_model`) with the diff applied
    (`diff`: the one already loaded from `path`)."""
    model, tokenizer, diff = load_base_for_diff(path, base_model, diff)
    model = get_method(diff.method).attach(model, diff.config)  # adapters / LoRA layers, if the method adds any
    apply_diff(model, diff, check_fingerprint=check_fingerprint)
    return model.eval(), tokenizer, diff
