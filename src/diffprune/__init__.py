"""diffprune: sparse task diffs (Diff Pruning) and the parameter-efficient baselines around it."""
__version__ = "0.1.0"

from .api import load_task_model, train  # noqa: E402
from .errors import DiffpruneError  # noqa: E402
from .storage.switch import TaskSwitcher  # noqa: E402

__all__ = ["train", "load_task_model", "DiffpruneError", "TaskSwitcher", "__version__"]
