"""Statistics about a task diff, for `inspect` and the reports: how sparse, where, and how many bytes."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..archs import group_order, layer_group, two_stacks
from . import layout
from .format import CONFIG_FILE, TENSOR_FILE, TaskDiff


def _by_group(counts: dict[str, int]) -> dict[str, int]:
    """Counts per layer group (`archs.layer_group`); an encoder-decoder's two stacks are kept apart."""
    stacks = two_stacks(counts)
    out: dict[str, int] = {}
    for name, n in counts.items():
        group = layer_group(name, stacks)
        out[group] = out.get(group, 0) + n
    return dict(sorted(out.items(), key=lambda kv: group_order(kv[0])))


def diff_stats(diff: TaskDiff, directory: str | os.PathLike | None = None) -> dict:
    """Summary numbers of `diff` (and of its files when `directory` is given).

    d, the number of diff-pruned parameters the sparsity is measured against, is
    ``extra["num_diff_params"]`` when the method recorded it, else the total size of the stored sparse
    tensors. Methods should record it: a tensor that ended with no nonzeros is not stored, so the stored
    shapes alone undercount d. `sparsity` is the paper's share of d that is nonzero (nnz / d).

    `task_params` is everything stored for the task (nonzeros + dense tensors, head included);
    `task_params_pct` puts it against the pretrained model's size (`extra["base_params"]`, head excluded).

    `sparse_bytes_per_nnz` is (position bytes + value bytes) / nnz as stored: read from the safetensors
    header when `directory` is given, else measured by packing the diff in memory (format 2, its
    `value_dtype` or float32). `bytes` splits the files into positions, values (int8 scales included),
    dense tensors, the safetensors header and diff_config.json; `bytes_per_nnz` divides each by nnz.
    """
    nnz_by_tensor = {name: delta.nnz for name, delta in sorted(diff.sparse.items())}
    nnz = sum(nnz_by_tensor.values())
    stored_numel = sum(delta.numel for delta in diff.sparse.values())
    recorded = diff.extra.get("num_diff_params")
    d = int(recorded) if recorded is not None else stored_numel
    dense_numel = {name: int(t.numel()) for name, t in sorted(diff.dense.items())}

    if directory is not None:
        directory = Path(directory)
        parts = _bytes_on_disk(directory / TENSOR_FILE)
        parts["config_file"] = (directory / CONFIG_FILE).stat().st_size
        stored_bytes = (directory / TENSOR_FILE).stat().st_size + parts["config_file"]
    else:
        tensors, _, _ = layout.pack_v2(diff.sparse, diff.value_dtype or "float32")
        parts = {"positions": _numbytes(tensors.pop(layout.POSITIONS)),
                 "values": sum(map(_numbytes, tensors.values())),
                 "dense": sum(map(_numbytes, diff.dense.values()))}
        stored_bytes = None
    sparse_bytes = parts["positions"] + parts["values"]

    return {
        "method": diff.method,
        "base_model": diff.base_model,
        "task": diff.task,
        "fingerprint": diff.fingerprint,
        "nnz": nnz,
        "nnz_by_tensor": nnz_by_tensor,
        "nnz_by_layer": _by_group(nnz_by_tensor),
        "num_diff_params": d,
        "num_diff_params_source": "extra" if recorded is not None else "stored shapes",
        "sparsity": nnz / d if d else None,
        "sparse_tensors": len(diff.sparse),
        "dense_params": sum(dense_numel.values()),
        "dense_params_by_layer": _by_group(dense_numel),
        "task_params": nnz + sum(dense_numel.values()),
        "base_params": diff.extra.get("base_params"),
        "task_params_pct": (100.0 * (nnz + sum(dense_numel.values())) / diff.extra["base_params"]
                            if diff.extra.get("base_params") else None),
        "sparse_bytes": sparse_bytes,
        "sparse_bytes_per_nnz": sparse_bytes / nnz if nnz else None,
        "stored_bytes": stored_bytes,
        "value_dtype": diff.value_dtype,
        "bytes": parts,
        "bytes_per_nnz": {k: v / nnz for k, v in parts.items()} if nnz else None,
    }


def _numbytes(t) -> int:
    return t.numel() * t.element_size()


def _bytes_on_disk(path: Path) -> dict[str, int]:
    """Bytes of each part of a tensor file, from its safetensors header (8-byte length + JSON offsets)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    parts = {"positions": 0, "values": 0, "dense": 0, "header": 8 + header_len}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if key.startswith("dense."):
            parts["dense"] += end - start
        elif key == layout.POSITIONS or key.endswith(".indices"):
            parts["positions"] += end - start
        else:  # sparse.values, sparse.scales, sparse.<name>.values
            parts["values"] += end - start
    return parts
