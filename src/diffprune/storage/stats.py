"""Statistics about a task diff, for `inspect` and the reports: how sparse, where, and how many bytes."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

from .format import CONFIG_FILE, TENSOR_FILE, TaskDiff, index_dtype

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)(?:\.|$)")
_HEAD_PARTS = {"classifier", "pre_classifier", "score", "qa_outputs", "lm_head", "cls"}
_EMBED_PARTS = {"wte", "wpe"}  # GPT-2 names its embeddings without the word


def layer_group(name: str) -> str:
    """Group a parameter name: "embeddings", "layer.N", "head" (task head) or "other" (pooler, final norm)."""
    match = _LAYER.search(name)
    if match:
        return f"layer.{int(match.group(1))}"
    parts = name.split(".")
    if any(p.startswith("embed") or p in _EMBED_PARTS for p in parts):
        return "embeddings"
    if any(p in _HEAD_PARTS for p in parts):
        return "head"
    return "other"


def _group_order(group: str) -> tuple:
    if group == "embeddings":
        return (0, 0)
    if group.startswith("layer."):
        return (1, int(group[6:]))
    return (2, 0) if group == "other" else (3, 0)


def _by_group(counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in counts.items():
        group = layer_group(name)
        out[group] = out.get(group, 0) + n
    return dict(sorted(out.items(), key=lambda kv: _group_order(kv[0])))


def diff_stats(diff: TaskDiff, directory: str | os.PathLike | None = None) -> dict:
    """Summary numbers of `diff` (and of its files when `directory` is given).

    d, the number of diff-pruned parameters the sparsity is measured against, is
    ``extra["num_diff_params"]`` when the method recorded it, else the total size of the stored sparse
    tensors. Methods should record it: a tensor that ended with no nonzeros is not stored, so the stored
    shapes alone undercount d. `sparsity` is the paper's share of d that is nonzero (nnz / d).

    `task_params` is everything stored for the task (nonzeros + dense tensors, head included);
    `task_params_pct` puts it against the pretrained model's size (`extra["base_params"]`, head excluded).

    `sparse_bytes_per_nnz` is (index bytes + value bytes) / nnz as stored: read from the safetensors header
    when `directory` is given, else from the storage rule (int32 positions, float32 values: 8).
    """
    nnz_by_tensor = {name: delta.nnz for name, delta in sorted(diff.sparse.items())}
    nnz = sum(nnz_by_tensor.values())
    stored_numel = sum(delta.numel for delta in diff.sparse.values())
    recorded = diff.extra.get("num_diff_params")
    d = int(recorded) if recorded is not None else stored_numel
    dense_numel = {name: int(t.numel()) for name, t in sorted(diff.dense.items())}

    if directory is not None:
        directory = Path(directory)
        sparse_bytes = _sparse_bytes_on_disk(directory / TENSOR_FILE)
        stored_bytes = (directory / TENSOR_FILE).stat().st_size + (directory / CONFIG_FILE).stat().st_size
    else:
        sparse_bytes = sum(delta.nnz * (4 + index_dtype(delta.shape).itemsize) for delta in diff.sparse.values())
        stored_bytes = None

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
    }


def _sparse_bytes_on_disk(path: Path) -> int:
    """Bytes of the `sparse.*` tensors, from the safetensors header (8-byte length + JSON offsets)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return sum(end - start for key, info in header.items() if key.startswith("sparse.")
               for start, end in [info["data_offsets"]])
