"""diffprune: sparse task diffs (Diff Pruning) and the parameter-efficient baselines around it."""
__version__ = "0.1.0"
