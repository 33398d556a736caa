"""Byte codings of the compact diff format (version 2): positions as varint gaps, values as byte planes.

Why these codings (measured on the trained MiniLM diffs at 0.5%, see benchmarks/RESULTS.md "Compact
diffs"): sorted flat positions turn into small gaps (median 8–65), and LEB128 varints store a gap below 128
in one byte; deflate then removes what is left of the skew (1.07–1.34 → 0.81–1.16 bytes per nonzero).
Values are split into byte planes (all low bytes, then all high bytes) before deflate, because the high
byte of a small float (sign + exponent) takes few distinct values while the low byte is noise: a 16-bit
value costs 1.4–1.7 bytes instead of 2. Both stages are lossless for the stored dtype, and decoding is
zlib (C) plus a handful of vectorised numpy passes (one per varint byte position, at most 10), never a
Python loop over entries.

Every decoder checks what it is given (lengths, terminated varints, canonical form, gap bounds) and raises
`DiffpruneError` with a clear message instead of returning a silently wrong diff.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..errors import DiffpruneError

VALUE_DTYPES = ("float32", "float16", "bfloat16", "int8")
LOSSY_DTYPES = ("int8",)  # float16/bfloat16 are lossless for the stored dtype; int8 rounds to 255 levels
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
_FLOAT16_MAX = 65504.0
_MAX_VARINT_BYTES = 10  # 64-bit gaps need at most ceil(64 / 7) bytes


def check_value_dtype(name: str) -> str:
    if name not in VALUE_DTYPES:
        raise DiffpruneError(f"unknown diff value dtype '{name}' (known: {', '.join(VALUE_DTYPES)})")
    return name


def default_value_dtype(model: torch.nn.Module | None) -> str:
    """The base model's dtype when it is a half type (nothing finer would survive applying), else float16."""
    if model is not None:
        for p in model.parameters():
            if p.is_floating_point():
                return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(p.dtype, "float16")
    return "float16"


# --------------------------------------------------------------------------------------------- deflate

def deflate(raw: bytes) -> bytes:
    return zlib.compress(raw, 9)


def inflate(data: bytes, raw_bytes: int, what: str) -> bytes:
    """Decompress exactly `raw_bytes` bytes (never more: a corrupt stream cannot blow up memory)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, raw_bytes + 1)
    except zlib.error as exc:
        raise DiffpruneError(f"{what}: the deflate stream is corrupt ({exc})") from None
    if len(out) != raw_bytes or not d.eof or d.unused_data:
        raise DiffpruneError(f"{what}: the deflate stream holds {'more' if len(out) > raw_bytes else 'less'} "
                             f"than the {raw_bytes} bytes the header announces (truncated or corrupt)")
    return out


# --------------------------------------------------------------------------------------------- positions

def gaps_of(indices: torch.Tensor) -> np.ndarray:
    """Strictly increasing flat positions → gaps g_i = p_i - p_{i-1} - 1 (p_{-1} = -1), all >= 0."""
    idx = indices.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.diff(idx, prepend=-1) - 1


def leb128_encode(gaps: np.ndarray) -> np.ndarray:
    """Unsigned LEB128: 7 bits per byte, low bits first, high bit set on every byte but the last."""
    g = gaps.astype(np.uint64)
    nbytes = np.ones(len(g), dtype=np.int64)
    rest = g >> np.uint64(7)
    while rest.any():
        nbytes += rest > 0
        rest >>= np.uint64(7)
    starts = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max()) if len(g) else 0):
        m = nbytes > k
        low = ((g[m] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[starts[m] + k] = low | ((nbytes[m] > k + 1).astype(np.uint8) << 7)
    return out


def leb128_decode(buf: np.ndarray, count: int, what: str) -> np.ndarray:
    """Inverse of `leb128_encode`; the stream must hold exactly `count` canonical varints."""
    buf = np.asarray(buf, dtype=np.uint8)
    last = buf < 0x80
    found = int(last.sum())
    if found != count or (len(buf) and not last[-1]):
        raise DiffpruneError(f"{what}: the position stream holds {found} complete varints"
                             f"{' and a cut-off one' if len(buf) and not last[-1] else ''}, the header "
                             f"announces {count} nonzeros (truncated or corrupt)")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise DiffpruneError(f"{what}: a varint in the position stream is longer than {_MAX_VARINT_BYTES} bytes")
    if bool(((buf[ends] == 0) & (lengths > 1)).any()):  # a trailing zero byte: two codes for one gap
        raise DiffpruneError(f"{what}: the position stream holds a non-canonical varint (trailing zero byte)")
    if bool(((lengths == _MAX_VARINT_BYTES) & (buf[ends] > 1)).any()):
        raise DiffpruneError(f"{what}: a gap in the position stream overflows 64 bits")
    out = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max())):
        m = lengths > k
        out[m] |= (buf[starts[m] + k] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * k)
    if bool((out >= np.uint64(2**63)).any()):
        raise DiffpruneError(f"{what}: a gap in the position stream is beyond any tensor size")
    return out.view(np.int64)


def positions_from_gaps(gaps: np.ndarray, numel: int, what: str) -> torch.Tensor:
    """Gaps of one tensor → its flat positions, refusing any that run past `numel`."""
    if len(gaps) == 0:
        return torch.zeros(0, dtype=torch.int64)
    if int(gaps.max()) >= numel:  # checked first, so the cumulative sum below cannot overflow
        raise DiffpruneError(f"{what}: a gap of {int(gaps.max())} runs past the tensor's {numel} elements")
    pos = np.cumsum(gaps + 1) - 1
    if int(pos[-1]) >= numel:
        raise DiffpruneError(f"{what}: the positions run past the tensor's {numel} elements (last is "
                             f"{int(pos[-1])})")
    return torch.from_numpy(pos)


# --------------------------------------------------------------------------------------------- values

def int8_quantize(values: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """Per-tensor absmax int8: q = round(v / s), s = max|v| / 127, v ≈ q·s (lossy).

    `scale` (the one a loaded int8 diff was stored with) is reused when the values are exactly its
    dequantised grid, so that load → save → load gives back the same bytes.
    """
    v = values.detach().float().cpu()
    if scale is not None and scale > 0:
        q = torch.round(v / scale).clamp(-127, 127)
        if torch.equal(q * torch.tensor(scale, dtype=torch.float32), v):
            return q.to(torch.int8), float(scale)
    absmax = float(v.abs().max()) if v.numel() else 0.0
    s = float(torch.tensor(absmax / 127.0, dtype=torch.float32)) if absmax > 0 else 0.0
    q = torch.round(v / s).clamp(-127, 127) if s > 0 else torch.zeros_like(v)
    return q.to(torch.int8), s


def cast_values(values: torch.Tensor, dtype: str, what: str) -> torch.Tensor:
    """float32 values → the stored float dtype, refusing values the dtype cannot hold."""
    v = values.detach().float().cpu()
    if dtype == "float16" and v.numel() and float(v.abs().max()) > _FLOAT16_MAX:
        raise DiffpruneError(f"{what}: a value of {float(v.abs().max()):.3g} is beyond float16's range "
                             "(65504); store it as bfloat16 or float32")
    return v.to(_TORCH[dtype])


def byteplanes(values: torch.Tensor) -> bytes:
    """Typed values → their bytes, plane by plane (byte 0 of every value, then byte 1, …)."""
    size = values.element_size()
    raw = values.contiguous().view(torch.uint8).reshape(-1, size).numpy()
    return np.ascontiguousarray(raw.T).tobytes()


def from_byteplanes(data: bytes, dtype: str, count: int) -> torch.Tensor:
    size = _TORCH[dtype].itemsize
    if count == 0:  # (an empty array's strides do not allow the dtype view below)
        return torch.zeros(0, dtype=_TORCH[dtype])
    planes = np.frombuffer(data, dtype=np.uint8).reshape(size, count)
    interleaved = np.ascontiguousarray(planes.T).reshape(-1).copy()  # 1-D, writable, value after value
    return torch.from_numpy(interleaved).view(_TORCH[dtype])


def as_stored(values: torch.Tensor, dtype: str, scale: float | None = None) -> torch.Tensor:
    """The float32 values a diff saved with `dtype` loads back with (what applying it will add)."""
    check_value_dtype(dtype)
    if dtype == "int8":
        q, s = int8_quantize(values, scale)
        return q.float() * torch.tensor(s, dtype=torch.float32)
    return values.detach().float().cpu().to(_TORCH[dtype]).float()
