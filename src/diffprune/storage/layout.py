"""The tensors inside diff.safetensors, per format version: how a diff's sparse part is packed and unpacked.

* Version 1 (the paper's count, 8 bytes per nonzero): per sparse tensor ``sparse.<name>.indices`` (int32,
  int64 only for tensors with 2^31 elements or more) and ``sparse.<name>.values`` (float32).
* Version 2 (compact, the default): one ``sparse.positions`` uint8 stream (per tensor in sorted name
  order, the gaps between its sorted flat positions as LEB128 varints, deflated), one ``sparse.values``
  uint8 stream (the values in the chosen dtype, split into byte planes, deflated), and for int8 values
  ``sparse.scales`` (float32, one absmax scale per sparse tensor). How each part is coded is written in
  ``coding`` (diff_config.json, and the safetensors metadata), so a reader never guesses.

Dense tensors are ``dense.<name>`` in their own dtype in both versions: they are small (a task head) or,
for dense methods, big enough that a memory-mapped raw tensor is worth more than a few percent of deflate.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffpruneError
from . import codec

_INT32_LIMIT = 2**31  # flat positions of tensors with fewer elements than this fit in int32
POSITIONS, VALUES, SCALES = "sparse.positions", "sparse.values", "sparse.scales"


def index_dtype(shape: tuple[int, ...]) -> torch.dtype:
    """int32 when every flat position of `shape` fits (all real layers), int64 otherwise (version 1)."""
    return torch.int32 if math.prod(shape) <= _INT32_LIMIT else torch.int64


def take(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise DiffpruneError(f"{path} lacks tensor '{key}' listed in diff_config.json") from None


# --------------------------------------------------------------------------------------------- version 1

def pack_v1(sparse: dict) -> tuple[dict, dict, None]:
    tensors, meta = {}, {}
    for name, delta in sorted(sparse.items()):
        idx = delta.indices.detach().to("cpu", index_dtype(delta.shape)).contiguous().clone()
        val = delta.values.detach().to("cpu", torch.float32).contiguous().clone()
        tensors[f"sparse.{name}.indices"], tensors[f"sparse.{name}.values"] = idx, val
        meta[name] = {"shape": list(delta.shape), "nnz": delta.nnz, "index_dtype": str(idx.dtype)[6:]}
    return tensors, meta, None


def unpack_v1(tensors: dict, sparse_meta: dict, path: Path, make) -> dict:
    sparse = {}
    for name, info in sparse_meta.items():
        idx = take(tensors, f"sparse.{name}.indices", path)
        val = take(tensors, f"sparse.{name}.values", path)
        if idx.dtype not in (torch.int32, torch.int64) or not val.is_floating_point():
            raise DiffpruneError(f"{path}: sparse tensor '{name}' has dtypes {idx.dtype}/{val.dtype}")
        sparse[name] = make(tuple(info["shape"]), idx.long(), val.float())
    return sparse


# --------------------------------------------------------------------------------------------- version 2

def pack_v2(sparse: dict, value_dtype: str) -> tuple[dict, dict, dict]:
    """(tensors, per-tensor meta, coding) of the compact layout."""
    codec.check_value_dtype(value_dtype)
    names = sorted(sparse)
    meta = {n: {"shape": list(sparse[n].shape), "nnz": sparse[n].nnz} for n in names}
    gaps = [codec.gaps_of(sparse[n].indices) for n in names]
    leb = codec.leb128_encode(np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.int64))
    count = sum(sparse[n].nnz for n in names)
    tensors = {POSITIONS: _bytes_tensor(codec.deflate(leb.tobytes()))}
    positions = {"tensor": POSITIONS, "scheme": "gap-leb128", "compression": "zlib", "raw_bytes": int(leb.size),
                 "count": count, "order": "sparse tensors in sorted name order, positions ascending"}
    if value_dtype == "int8":
        quantized = [codec.int8_quantize(sparse[n].values, sparse[n].int8_scale) for n in names]
        raw = b"".join(q.numpy().tobytes() for q, _ in quantized)
        tensors[SCALES] = torch.tensor([s for _, s in quantized], dtype=torch.float32)
        scheme = "absmax-int8"
    else:
        typed = [codec.cast_values(sparse[n].values, value_dtype, f"sparse diff '{n}'") for n in names]
        raw = codec.byteplanes(torch.cat(typed)) if typed else b""
        scheme = "byteplanes"
    tensors[VALUES] = _bytes_tensor(codec.deflate(raw))
    values = {"tensor": VALUES, "dtype": value_dtype, "scheme": scheme, "compression": "zlib",
              "raw_bytes": len(raw), "count": count, "lossy": value_dtype in codec.LOSSY_DTYPES}
    if value_dtype == "int8":
        values["scales"] = SCALES
    return tensors, meta, {"positions": positions, "values": values}


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def _stream(tensors: dict, key: str, path: Path) -> bytes:
    t = take(tensors, key, path)
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise DiffpruneError(f"{path}: '{key}' must be a 1-D uint8 byte stream, got {t.dtype} {list(t.shape)}")
    return t.numpy().tobytes()


def _int_field(info: dict, key: str, part: str) -> int:
    value = info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DiffpruneError(f"coding.{part}.{key} must be a non-negative integer, got {value!r}")
    return value


def check_coding(coding, path: Path) -> str:
    """Refuse codings this reader does not know; return the value dtype."""
    if not isinstance(coding, dict) or not isinstance(coding.get("positions"), dict) \
            or not isinstance(coding.get("values"), dict):
        raise DiffpruneError(f"{path}: the 'coding' section of diff_config.json is missing or malformed")
    pos, val = coding["positions"], coding["values"]
    if (pos.get("scheme"), pos.get("compression"), pos.get("tensor")) != ("gap-leb128", "zlib", POSITIONS):
        raise DiffpruneError(f"{path}: unknown position coding {pos.get('scheme')!r}/{pos.get('compression')!r}")
    dtype = val.get("dtype")
    if dtype not in codec.VALUE_DTYPES:
        raise DiffpruneError(f"{path}: unknown value dtype {dtype!r} in the coding")
    want = "absmax-int8" if dtype == "int8" else "byteplanes"
    if (val.get("scheme"), val.get("compression"), val.get("tensor")) != (want, "zlib", VALUES):
        raise DiffpruneError(f"{path}: unknown value coding {val.get('scheme')!r}/{val.get('compression')!r} "
                             f"for {dtype}")
    return dtype


def unpack_v2(tensors: dict, sparse_meta: dict, coding: dict, path: Path, make) -> dict:
    dtype = check_coding(coding, path)
    pos, val = coding["positions"], coding["values"]
    names = sorted(sparse_meta)
    counts = [sparse_meta[n]["nnz"] for n in names]
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
        raise DiffpruneError(f"{path}: a sparse tensor's nnz in diff_config.json is not a non-negative integer")
    total = sum(counts)
    for part, info in (("positions", pos), ("values", val)):
        if _int_field(info, "count", part) != total:
            raise DiffpruneError(f"{path}: coding.{part}.count is {info['count']}, but the sparse tensors hold "
                                 f"{total} nonzeros")
    leb = codec.inflate(_stream(tensors, POSITIONS, path), _int_field(pos, "raw_bytes", "positions"),
                        f"{path} positions")
    gaps = codec.leb128_decode(np.frombuffer(leb, dtype=np.uint8), total, f"{path} positions")
    size = 1 if dtype == "int8" else torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if _int_field(val, "raw_bytes", "values") != total * size:
        raise DiffpruneError(f"{path}: coding.values.raw_bytes is {val['raw_bytes']}, but {total} {dtype} "
                             f"values take {total * size}")
    raw = codec.inflate(_stream(tensors, VALUES, path), val["raw_bytes"], f"{path} values")
    if dtype == "int8":
        if val.get("scales") != SCALES:
            raise DiffpruneError(f"{path}: int8 values need coding.values.scales = '{SCALES}'")
        scales = take(tensors, SCALES, path)
        if scales.dtype != torch.float32 or list(scales.shape) != [len(names)] or \
                not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise DiffpruneError(f"{path}: '{SCALES}' must be {len(names)} finite non-negative float32 scales")
        flat = torch.from_numpy(np.frombuffer(raw, dtype=np.int8).copy())
    else:
        flat = codec.from_byteplanes(raw, dtype, total)
    sparse, start = {}, 0
    for i, (name, n) in enumerate(zip(names, counts)):
        shape = tuple(sparse_meta[name]["shape"])
        what = f"{path} sparse tensor '{name}'"
        idx = codec.positions_from_gaps(gaps[start:start + n], math.prod(shape), what)
        chunk = flat[start:start + n]
        if dtype == "int8":
            scale = float(scales[i])
            sparse[name] = make(shape, idx, chunk.float() * scales[i], int8_scale=scale)
        else:
            sparse[name] = make(shape, idx, chunk.float())
        start += n
    return sparse
