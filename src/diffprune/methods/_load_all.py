"""Import every built-in method so that each registers itself."""
from . import diff_pruning, full  # noqa: F401
