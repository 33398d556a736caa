"""Tasks: GLUE and SQuAD task specs as data, task kinds (classification, qa) as plug-ins, custom tasks over the user's files, data loading, metrics, demo data.

    spec = get_task("rte")                                  # or custom_task(train, dev, ["text"], "label")
    data = load_task_data(spec, data_dir="glue_data")       # TaskData: .train / .evals, columns text_a[, text_b], label
    scores = compute_metrics(spec, logits, labels)          # {"accuracy": 0.71, "main": 0.71}
"""
from diffprune.tasks.demo_data import demo_task, write_demo_data
from diffprune.tasks.kinds import EvalSplit, task_kind
from diffprune.tasks.loading import TaskData, load_task_data
from diffprune.tasks.metrics import METRICS, compute_metrics
from diffprune.tasks.specs import TaskSpec, custom_task, get_task, list_tasks

__all__ = ["TaskSpec", "TaskData", "list_tasks", "get_task", "custom_task", "load_task_data",
           "compute_metrics", "METRICS", "write_demo_data", "demo_task", "task_kind", "EvalSplit"]
