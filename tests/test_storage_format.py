"""The compact diff format (version 2): codings against independent arithmetic, round trips, strict loading,
and the version-1 file written by diffprune before version 2 existed (tests/data/diff_v1)."""
from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from conftest import make_tiny
from diffprune.errors import DiffpruneError
from diffprune.storage import CONFIG_FILE, TENSOR_FILE, SparseDelta, TaskDiff, apply_diff, load_diff, save_diff
from diffprune.storage import codec
from test_storage import assert_same_diff, make_diff

V1_DIR = Path(__file__).parent / "data" / "diff_v1"


# ------------------------------------------------------------------------------------------ codings

def test_leb128_bytes_match_the_definition():
    gaps = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**35 + 5])
    # written out by hand: 7 bits per byte, least significant first, 0x80 on all but the last byte
    want = [0x00, 0x01, 0x7F, 0x80, 0x01, 0xAC, 0x02, 0xFF, 0x7F, 0x80, 0x80, 0x01,
            0x85, 0x80, 0x80, 0x80, 0x80, 0x01]
    assert codec.leb128_encode(gaps).tolist() == want
    assert codec.leb128_decode(np.array(want, dtype=np.uint8), len(gaps), "t").tolist() == gaps.tolist()


def test_gaps_and_positions():
    idx = torch.tensor([0, 1, 5, 6, 99])
    gaps = codec.gaps_of(idx)
    assert gaps.tolist() == [0, 0, 3, 0, 92]
    assert codec.positions_from_gaps(gaps, 100, "t").tolist() == idx.tolist()
    with pytest.raises(DiffpruneError, match="run past the tensor's 99 elements"):
        codec.positions_from_gaps(gaps, 99, "t")
    with pytest.raises(DiffpruneError, match="gap of 92 runs past"):
        codec.positions_from_gaps(np.array([92]), 50, "t")


@pytest.mark.parametrize("stream,count,match", [
    ([0x80], 1, "cut-off"),                  # unterminated varint
    ([0x01, 0x02], 3, "announces 3"),        # too few
    ([0x01, 0x02], 1, "announces 1"),        # too many
    ([0x81, 0x00], 1, "non-canonical"),      # 1 written in two bytes
    ([0xFF] * 10 + [0x01], 1, "longer than"),
])
def test_leb128_refuses_broken_streams(stream, count, match):
    with pytest.raises(DiffpruneError, match=match):
        codec.leb128_decode(np.array(stream, dtype=np.uint8), count, "t")


def test_inflate_refuses_wrong_length_and_garbage():
    data = zlib.compress(b"abcdef")
    assert codec.inflate(data, 6, "t") == b"abcdef"
    with pytest.raises(DiffpruneError, match="more than the 5 bytes"):
        codec.inflate(data, 5, "t")
    with pytest.raises(DiffpruneError, match="less than the 7 bytes"):
        codec.inflate(data, 7, "t")
    with pytest.raises(DiffpruneError, match="less than|corrupt"):
        codec.inflate(data[:-3], 6, "t")
    with pytest.raises(DiffpruneError, match="corrupt"):
        codec.inflate(b"\x13\x37 not zlib", 6, "t")


def test_int8_absmax_by_hand():
    q, s = codec.int8_quantize(torch.tensor([0.5, -1.27, 0.01]))
    assert s == pytest.approx(0.01) and q.tolist() == [50, -127, 1]
    back = codec.as_stored(torch.tensor([0.5, -1.27, 0.01]), "int8")
    assert torch.allclose(back, torch.tensor([0.5, -1.27, 0.01]), atol=0.005)


def test_decoding_is_vectorised():
    g = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randperm(20_000_000, generator=g)[:1_000_000]).values
    leb = codec.leb128_encode(codec.gaps_of(idx))
    start = time.perf_counter()
    got = codec.positions_from_gaps(codec.leb128_decode(leb, idx.numel(), "t"), 20_000_000, "t")
    assert time.perf_counter() - start < 5.0  # a per-entry Python loop takes far longer for 10^6 entries
    assert torch.equal(got, idx)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_round_trip_is_bit_identical_for_the_stored_dtype(tmp_path, dtype):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    save_diff(diff, tmp_path / "a", model, value_dtype=dtype)
    a = load_diff(tmp_path / "a")
    assert a.value_dtype == dtype
    for name, delta in diff.sparse.items():
        assert torch.equal(a.sparse[name].indices, delta.indices.long())
        assert torch.equal(a.sparse[name].values, codec.as_stored(delta.values, dtype))  # what apply will add
        if dtype == "float32":
            assert torch.equal(a.sparse[name].values, delta.values)
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert meta["coding"]["values"]["lossy"] == (dtype == "int8")
    save_diff(a, tmp_path / "b", None)  # keeps the loaded dtype
    b = load_diff(tmp_path / "b")
    assert_same_diff(a, b)
    assert (tmp_path / "a" / TENSOR_FILE).read_bytes() == (tmp_path / "b" / TENSOR_FILE).read_bytes()
    # the compact diff applies like the in-memory one rounded to its dtype
    m1, m2 = make_tiny("bert"), make_tiny("bert")
    rounded = TaskDiff(diff.method, diff.base_model, diff.task, diff.label_names, diff.config,
                       {n: SparseDelta(d.shape, d.indices, codec.as_stored(d.values, dtype))
                        for n, d in diff.sparse.items()}, diff.dense, diff.extra, diff.fingerprint)
    apply_diff(m1, rounded)
    apply_diff(m2, b)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_empty_and_zero_nnz_entries(tmp_path):
    diff = TaskDiff("full", "x", "t", None, {}, {"z.weight": SparseDelta((3,), torch.zeros(0, dtype=torch.long),
                                                                          torch.zeros(0))},
                    {"w": torch.ones(2)})
    for dtype in codec.VALUE_DTYPES:
        save_diff(diff, tmp_path / dtype, None, value_dtype=dtype)
        assert load_diff(tmp_path / dtype).sparse["z.weight"].nnz == 0
    save_diff(TaskDiff("full", "x", "t", None, {}, {}, {"w": torch.ones(2)}), tmp_path / "none", None)
    assert load_diff(tmp_path / "none").sparse == {}


def test_float16_overflow_is_refused_and_unknown_dtypes_too(tmp_path):
    diff = TaskDiff("diff-pruning", "x", "t", None, {}, {"a": SparseDelta((4,), torch.tensor([1]),
                                                                           torch.tensor([1e5]))}, {})
    with pytest.raises(DiffpruneError, match="beyond float16's range"):
        save_diff(diff, tmp_path / "d", None, value_dtype="float16")
    with pytest.raises(DiffpruneError, match="unknown diff value dtype 'fp8'"):
        save_diff(diff, tmp_path / "d", None, value_dtype="fp8")
    with pytest.raises(DiffpruneError, match="float32 values only"):
        save_diff(diff, tmp_path / "d", None, value_dtype="bfloat16", format_version=1)
    assert not (tmp_path / "d").exists()
    save_diff(diff, tmp_path / "d", None, value_dtype="bfloat16")
    assert load_diff(tmp_path / "d").sparse["a"].values.tolist() == [99840.0]  # bfloat16's nearest


def test_default_value_dtype_follows_half_base_models():
    model = make_tiny("bert")
    assert codec.default_value_dtype(model) == "float16"
    assert codec.default_value_dtype(model.to(torch.bfloat16)) == "bfloat16"
    assert codec.default_value_dtype(None) == "float16"


def test_old_version_file_written_by_diffprune_before_version_2_still_loads(tmp_path):
    assert json.loads((V1_DIR / CONFIG_FILE).read_text())["format_version"] == 1
    diff = load_diff(V1_DIR)
    assert diff.value_dtype == "float32" and diff.label_names == ["neg", "pos"]
    assert diff.sparse["layer.0.weight"].indices.tolist() == [1, 7, 19]
    assert diff.sparse["layer.0.weight"].values.tolist() == [0.5, -0.25, 0.125]
    assert diff.sparse["layer.0.bias"].indices.tolist() == [0, 6]
    assert torch.equal(diff.dense["classifier.weight"], torch.arange(6.0).reshape(2, 3) / 8)
    save_diff(diff, tmp_path / "v2", None)  # converted to version 2, float32 values: nothing changes
    assert_same_diff(diff, load_diff(tmp_path / "v2"))
    save_diff(diff, tmp_path / "v1", None, format_version=1)  # and written the old way again
    assert (tmp_path / "v1" / TENSOR_FILE).read_bytes() == (V1_DIR / TENSOR_FILE).read_bytes()


# ------------------------------------------------------------------------------------------ strict loading

@pytest.fixture
def saved(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    return save_diff(diff, tmp_path / "diff", model, value_dtype="float16")


def _edit(saved, tensors=None, coding=None, sparse=None):
    """Change stored tensors or header fields, dropping the checksum so the decoders' checks are what runs."""
    t = safetensors.torch.load_file(str(saved / TENSOR_FILE))
    if tensors:
        tensors(t)
    safetensors.torch.save_file(t, str(saved / TENSOR_FILE))
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta.pop("tensor_file_sha256")
    if coding:
        coding(meta["coding"])
    if sparse:
        sparse(meta["tensors"]["sparse"])
    (saved / CONFIG_FILE).write_text(json.dumps(meta))


def _restream(t, key, mutate):
    raw = bytearray(zlib.decompress(t[key].numpy().tobytes()))
    raw = mutate(raw)
    t[key] = torch.from_numpy(np.frombuffer(zlib.compress(bytes(raw)), dtype=np.uint8).copy())
    return len(raw)


def _set_last_nonterminal(raw):
    raw[-1] |= 0x80
    return raw


def _big_first_gap(raw):
    return bytearray([0xFF, 0xFF, 0x7F]) + raw[1:]  # first gap 2^21 - 1: past every tiny tensor


@pytest.mark.parametrize("case,match", [
    ("truncated_positions", "deflate stream"),
    ("cut_varint", "cut-off"),
    ("gap_past_numel", "runs past"),
    ("nnz_wrong", "coding.positions.count"),
    ("values_short", "raw_bytes"),
    ("unknown_scheme", "unknown position coding"),
    ("unknown_dtype", "unknown value dtype"),
    ("stream_dtype", "1-D uint8 byte stream"),
    ("missing_values", "lacks tensor 'sparse.values'"),
    ("no_coding", "'coding' section"),
])
def test_corrupt_compact_files_are_refused(saved, case, match):
    if case == "truncated_positions":
        _edit(saved, tensors=lambda t: t.update({"sparse.positions": t["sparse.positions"][:-4].clone()}))
    elif case == "cut_varint":
        _edit(saved, tensors=lambda t: _restream(t, "sparse.positions", _set_last_nonterminal))
    elif case == "gap_past_numel":
        sizes = {}
        _edit(saved, tensors=lambda t: sizes.update(n=_restream(t, "sparse.positions", _big_first_gap)),
              coding=lambda c: c["positions"].update(raw_bytes=sizes["n"]))
    elif case == "nnz_wrong":

        def bump(sparse):
            name = sorted(sparse)[0]
            sparse[name]["nnz"] += 1
        _edit(saved, sparse=bump)
    elif case == "values_short":
        _edit(saved, coding=lambda c: c["values"].update(raw_bytes=c["values"]["raw_bytes"] - 2))
    elif case == "unknown_scheme":
        _edit(saved, coding=lambda c: c["positions"].update(scheme="elias-fano"))
    elif case == "unknown_dtype":
        _edit(saved, coding=lambda c: c["values"].update(dtype="float8"))
    elif case == "stream_dtype":
        _edit(saved, tensors=lambda t: t.update({"sparse.values": t["sparse.values"].to(torch.int16)}))
    elif case == "missing_values":
        _edit(saved, tensors=lambda t: t.pop("sparse.values"))
    elif case == "no_coding":
        _edit(saved, coding=lambda c: c.clear())
    with pytest.raises(DiffpruneError, match=match):
        load_diff(saved)


def test_bad_int8_scales_are_refused(tmp_path):
    model = make_tiny("bert")
    diff, _ = make_diff(model)
    out = save_diff(diff, tmp_path / "d", model, value_dtype="int8")
    shutil.copytree(out, tmp_path / "e")
    _edit(out, tensors=lambda t: t["sparse.scales"].__setitem__(0, float("nan")))
    with pytest.raises(DiffpruneError, match="finite non-negative float32 scales"):
        load_diff(out)
    _edit(tmp_path / "e", tensors=lambda t: t.pop("sparse.scales"))
    with pytest.raises(DiffpruneError, match="lacks tensor 'sparse.scales'"):
        load_diff(tmp_path / "e")
