"""Import every built-in method so that each registers itself."""
from . import diff_pruning, full  # noqa: F401
from . import bitfit, last_layer, lt_sft, non_adaptive  # noqa: F401
from . import lora  # noqa: F401
from . import adapters  # noqa: F401
from . import head_pruning, prune_lora  # noqa: F401
