"""Hostile GGUF files: every malformed file must raise ferroquant.FormatError quickly, naming the
field and the byte offset, without allocating much beyond the file's size; no input may crash,
hang or raise anything else. Section boundaries come from gguf-py's reader on the pristine file,
so the corpus does not trust our own parser to find them."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf import _GgufInitParams, _libggml_gguf

import ferroquant as fq
import ferroquant.gguf as fg

import data
import peers

gguf = peers.require("gguf")

ERROR_RE = re.compile(r"^(?P<field>.+) at byte offset (?P<offset>\d+): (?P<message>.+)$", re.S)


def _base_file(path) -> bytes:
    """A small real file written by gguf-py: every value type, nested arrays, three tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", 4096)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("flag", True)
    w.add_int8("i8", -3)
    w.add_uint64("u64", 2**40)
    w.add_float64("f64", 0.5)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "ab", "ü"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.5])
    w.add_key_value("nested", [[1, 2], ["xy"]], gguf.GGUFValueType.ARRAY)
    x = data.make("normal", 4, 64, 0)
    w.add_tensor("a.q8_0", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.add_tensor("b.f32", x[:2].copy())
    w.add_tensor("c.q4_0", gguf.quants.quantize(x[:1], gguf.GGMLQuantizationType.Q4_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    raw = _base_file(path)
    r = gguf.GGUFReader(str(path))
    with fg.open(path) as f:  # the pristine file is fine
        assert len(f.tensors) == 3
    kv_offsets = [fld.offset for k, fld in r.fields.items() if not k.startswith("GGUF.")]
    ti_offsets = [t.field.offset for t in r.tensors]
    data_ends = [t.data_offset + t.n_bytes for t in r.tensors]
    boundaries = sorted({0, 4, 8, 16, 24, *kv_offsets, *ti_offsets, r.data_offset,
                         *(t.data_offset for t in r.tensors), *data_ends})  # fmt: skip
    return {"raw": raw, "reader": r, "kv": kv_offsets, "ti": ti_offsets,
            "boundaries": boundaries, "end": max(data_ends)}  # fmt: skip


def _open_bytes(tmp_path, raw: bytes, name: str = "x.gguf"):
    p = tmp_path / name
    p.write_bytes(raw)
    t0 = time.perf_counter()
    try:
        with fg.open(p) as f:
            for t in f.tensors.values():
                t.data.sum()
            return f.metadata
    finally:
        assert time.perf_counter() - t0 < 2.0, "parsing took too long"


def _expect_format_error(tmp_path, raw: bytes, field_part: str = "", message_part: str = ""):
    with pytest.raises(fq.FormatError) as e:
        _open_bytes(tmp_path, raw)
    m = ERROR_RE.match(str(e.value))
    assert m, f"error does not name a field and offset: {e.value}"
    assert int(m["offset"]) <= max(len(raw), 24), str(e.value)
    assert field_part in m["field"], str(e.value)
    assert message_part in m["message"], str(e.value)
    return m


def test_truncated_at_every_section_boundary(tmp_path, base):
    raw = base["raw"]
    for cut in base["boundaries"]:
        for c in (cut - 1, cut, cut + 1):
            if 0 <= c < base["end"]:
                m = _expect_format_error(tmp_path, raw[:c])
                assert int(m["offset"]) <= c


def test_truncated_at_many_byte_offsets(tmp_path, base):
    raw, end = base["raw"], base["end"]
    for c in list(range(0, base["reader"].data_offset + 8)) + list(range(0, end, 7)):
        _expect_format_error(tmp_path, raw[:c])
    # Only the padding after the last tensor may be cut.
    for c in range(end, len(raw) + 1):
        _open_bytes(tmp_path, raw[:c])


def _patch(raw: bytes, offset: int, fmt: str, *values) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def test_header_fields(tmp_path, base):
    raw = base["raw"]
    _expect_format_error(tmp_path, b"GGML" + raw[4:], "header.magic")
    _expect_format_error(tmp_path, _patch(raw, 4, "<I", 1), "header.version", "version 1")
    _expect_format_error(tmp_path, _patch(raw, 4, "<I", 7), "header.version", "unsupported")
    _expect_format_error(tmp_path, _patch(raw, 4, ">I", 3), "header.version", "big-endian")
    for n in (2**63, 2**64 - 1, 10**9, 10**5):
        _expect_format_error(tmp_path, _patch(raw, 8, "<Q", n), "header.tensor_count")
        _expect_format_error(tmp_path, _patch(raw, 16, "<Q", n), "header.kv_count")


def _kv_layout(raw: bytes, offset: int):
    """(key length, key end, value type offset) of the pair at `offset`."""
    klen = struct.unpack_from("<Q", raw, offset)[0]
    return klen, offset + 8 + klen


def test_huge_lengths_and_counts_in_metadata(tmp_path, base):
    raw, kvs = base["raw"], base["kv"]
    for n in (2**63, 2**64 - 1, 2**40, len(raw)):
        _expect_format_error(tmp_path, _patch(raw, kvs[1], "<Q", n), f"metadata[{1}].key")
    # tokenizer.ggml.tokens: array type at key end + 4, element type, count.
    tok = next(o for o in kvs if raw[o + 8 : o + 8 + 21] == b"tokenizer.ggml.tokens")
    _, kend = _kv_layout(raw, tok)
    for n in (2**63, 2**61, 2**32 + 1, 10**6):
        _expect_format_error(tmp_path, _patch(raw, kend + 8, "<Q", n), "tokenizer.ggml.tokens")
    # the first token's string length
    _expect_format_error(tmp_path, _patch(raw, kend + 16, "<Q", 2**62), "tokenizer.ggml.tokens")
    # a string value claiming more bytes than the file has
    arch = kvs[0]
    _, kend = _kv_layout(raw, arch)
    _expect_format_error(tmp_path, _patch(raw, kend + 4, "<Q", 2**50), "general.architecture")


def test_unknown_types_bad_values_and_utf8(tmp_path, base):
    raw, kvs = base["raw"], base["kv"]
    for k in kvs:
        _, kend = _kv_layout(raw, k)
        _expect_format_error(tmp_path, _patch(raw, kend, "<I", 13), ".type", "unknown")
        _expect_format_error(tmp_path, _patch(raw, kend, "<I", 2**31), ".type", "unknown")
    tok = next(o for o in kvs if raw[o + 8 : o + 8 + 21] == b"tokenizer.ggml.tokens")
    _, kend = _kv_layout(raw, tok)
    _expect_format_error(tmp_path, _patch(raw, kend + 4, "<I", 99), "element_type", "unknown")
    # bad UTF-8 in a key, in a string value, in a tensor name
    _expect_format_error(tmp_path, _patch(raw, kvs[0] + 8, "<B", 0xFF), "key", "UTF-8")
    _expect_format_error(tmp_path, _patch(raw, kend + 24, "<B", 0xC3), "tokens", "UTF-8")
    _expect_format_error(tmp_path, _patch(raw, base["ti"][0] + 8, "<B", 0x80), "name", "UTF-8")
    # a bool that is neither 0 nor 1
    flag = next(o for o in kvs if raw[o + 8 : o + 12] == b"flag")
    _, kend = _kv_layout(raw, flag)
    _expect_format_error(tmp_path, _patch(raw, kend + 4, "<B", 2), "flag", "bool")
    # duplicate keys: rename "f64" to "u64" (same length, so the layout stays valid)
    f64 = next(o for o in kvs if raw[o + 8 : o + 11] == b"f64")
    dup = bytearray(raw)
    dup[f64 + 8 : f64 + 11] = b"u64"
    _expect_format_error(tmp_path, bytes(dup), "key", "duplicate key")


def _ti_layout(raw: bytes, offset: int):
    """Offsets of n_dims, dims, type and data offset of the tensor info at `offset`."""
    nlen = struct.unpack_from("<Q", raw, offset)[0]
    nd_at = offset + 8 + nlen
    n_dims = struct.unpack_from("<I", raw, nd_at)[0]
    type_at = nd_at + 4 + 8 * n_dims
    return nd_at, nd_at + 4, type_at, type_at + 4


def test_tensor_infos(tmp_path, base):
    raw, tis = base["raw"], base["ti"]
    a_nd, a_dims, a_type, a_off = _ti_layout(raw, tis[0])
    b_nd, b_dims, b_type, b_off = _ti_layout(raw, tis[1])
    _expect_format_error(tmp_path, _patch(raw, a_nd, "<I", 5), "n_dims", "at most 4")
    _expect_format_error(tmp_path, _patch(raw, a_nd, "<I", 2**32 - 1), "n_dims")
    # overflowing dimension products, and sizes far past the file
    _expect_format_error(tmp_path, _patch(raw, a_dims, "<QQ", 2**63, 4), "dims", "overflow")
    _expect_format_error(tmp_path, _patch(raw, a_dims, "<QQ", 2**32, 2**32), "dims", "overflow")
    _expect_format_error(tmp_path, _patch(raw, a_dims, "<QQ", 2**30, 2**20), "offset", "past")
    _expect_format_error(tmp_path, _patch(raw, a_dims, "<Q", 48), "dims", "block size")
    # unknown tensor types (4 and 5 were removed from ggml)
    for t in (4, 5, 42, 99, 2**31):
        _expect_format_error(tmp_path, _patch(raw, a_type, "<I", t), "type", "unknown")
    # misaligned, out-of-range and overlapping offsets
    b_offset = struct.unpack_from("<Q", raw, b_off)[0]
    _expect_format_error(tmp_path, _patch(raw, b_off, "<Q", b_offset + 1), "offset", "alignment")
    _expect_format_error(tmp_path, _patch(raw, b_off, "<Q", b_offset + 2**40), "offset", "past")
    _expect_format_error(tmp_path, _patch(raw, b_off, "<Q", 2**64 - 32), "offset", "past")
    _expect_format_error(tmp_path, _patch(raw, b_off, "<Q", 0), "offset", "overlaps")
    # duplicate tensor names: rename "c.q4_0" to "a.q8_0" (same length)
    c_name = tis[2] + 8
    dup = bytearray(raw)
    assert dup[c_name : c_name + 6] == b"c.q4_0"
    dup[c_name : c_name + 6] = b"a.q8_0"
    _expect_format_error(tmp_path, bytes(dup), "name", "duplicate tensor")


def test_bad_alignment(tmp_path):
    path = tmp_path / "a.gguf"
    for val, add in ((48, "add_uint32"), (0, "add_uint32"), (32, "add_uint64"), (32, "add_int32")):
        w = gguf.GGUFWriter(str(path), "llama")
        getattr(w, add)("general.alignment", val)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _expect_format_error(tmp_path, path.read_bytes(), "general.alignment")


def test_deep_nesting_and_memory_bounded(tmp_path):
    """Hostile headers in a subprocess with a cap on its address space: a parser that trusted a
    count would fail to allocate (and abort) instead of raising FormatError."""
    cases = {}
    hdr = b"GGUF" + struct.pack("<I", 3)
    cases["kv_count"] = hdr + struct.pack("<QQ", 0, 10**8) + b"\0" * 4096
    cases["tensor_count"] = hdr + struct.pack("<QQ", 10**8, 0) + b"\0" * 4096
    arr = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 10**8)
    cases["string_array"] = hdr + struct.pack("<QQ", 0, 1) + arr + b"\0" * 4096
    arr = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 9, 10**8)
    cases["array_array"] = hdr + struct.pack("<QQ", 0, 1) + arr + b"\0" * 4096
    deep = struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10**5
    cases["deep"] = hdr + struct.pack("<QQ", 0, 1) + deep
    name = struct.pack("<Q", 1) + b"t" + struct.pack("<I", 2) + struct.pack("<QQ", 2**31, 2**31)
    cases["dims"] = hdr + struct.pack("<QQ", 1, 0) + name + struct.pack("<IQ", 0, 0)
    for k, raw in cases.items():
        (tmp_path / f"{k}.gguf").write_bytes(raw)
    # A sparse 1 GiB file whose kv count (1e7 pairs of at least 13 bytes, under MAX_KV) fits in
    # its size: a parser that reserved the claimed count up front would ask for about 1 GiB more
    # than the headroom; ours finds the duplicate (empty) key in the second pair.
    huge = 1 << 30
    with open(tmp_path / "sparse_kv_count.gguf", "wb") as fh:
        fh.write(hdr + struct.pack("<QQ", 0, 10**7))
        fh.truncate(huge)
    cases["sparse_kv_count"] = b""
    script = textwrap.dedent(f"""
        import resource, sys, glob
        import ferroquant as fq, ferroquant.gguf as fg
        def vm():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        limit = vm() + {huge} + 256 * 2**20  # the map of the largest file, plus headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for p in sorted(glob.glob({str(tmp_path)!r} + "/*.gguf")):
            try:
                fg.open(p)
            except fq.FormatError as e:
                print(p.rsplit("/", 1)[1], "|", e)
            else:
                print(p, "parsed", file=sys.stderr)
                sys.exit(2)
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("address-space limit via /proc is Linux-only")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" | ", 1) for line in r.stdout.strip().splitlines())
    assert set(lines) == {f"{k}.gguf" for k in cases}
    assert lines["deep.gguf"].startswith('metadata "k"') and "nested" in lines["deep.gguf"]
    assert "header.kv_count" in lines["kv_count.gguf"]
    assert "header.tensor_count" in lines["tensor_count.gguf"]
    assert "duplicate key" in lines["sparse_kv_count.gguf"]
    assert ".count" in lines["string_array.gguf"] and ".count" in lines["array_array.gguf"]
    assert "past the end" in lines["dims.gguf"] or "overflow" in lines["dims.gguf"]


@st.composite
def _mutations(draw, n: int):
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["set", "flip", "u32", "u64", "cut", "insert", "delete"]),
        st.integers(0, n - 1),
        st.integers(0, 2**64 - 1),
    ), min_size=1, max_size=4))  # fmt: skip
    return ops


def _mutate(raw: bytes, ops) -> bytes:
    b = bytearray(raw)
    for op, at, v in ops:
        if not b:
            break
        at %= len(b)
        if op == "set":
            b[at] = v & 0xFF
        elif op == "flip":
            b[at] ^= 1 << (v % 8)
        elif op in ("u32", "u64"):
            size = 4 if op == "u32" else 8
            interesting = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, v]
            val = interesting[v % len(interesting)] & (2 ** (8 * size) - 1)
            chunk = val.to_bytes(size, "little")[: len(b) - at]
            b[at : at + len(chunk)] = chunk
        elif op == "cut":
            del b[at:]
        elif op == "insert":
            b[at:at] = v.to_bytes(8, "little")[: 1 + v % 8]
        else:
            del b[at : at + 1 + v % 16]
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data_=st.data())
def test_mutation_fuzz_only_format_errors(base, fuzz_dir, data_):
    raw = base["raw"]
    # Mostly mutate the header, where the structure is; sometimes anywhere.
    n = base["reader"].data_offset if data_.draw(st.booleans()) else len(raw)
    mutated = _mutate(raw, data_.draw(_mutations(n)))
    try:
        md = _open_bytes(fuzz_dir, mutated)
    except fq.FormatError as e:
        assert ERROR_RE.match(str(e)), str(e)
        return
    assert isinstance(md, dict)
    # Whatever parses can be used: every legacy/float tensor dequantizes.
    with fg.open(fuzz_dir / "x.gguf") as f:
        for t in f.tensors.values():
            assert t.data.nbytes == t.nbytes
            if t.qtype in ("f32", "f16", "bf16", "q4_0", "q8_0") and t.n_elements > 0:
                y = t.dequantize()
                assert y.shape == t.shape
                assert np.asarray(y).dtype == np.float32


@pytest.fixture(scope="module")
def flat_base(tmp_path_factory):
    """A file libggml's C parser accepts too (it does not support nested arrays)."""
    path = tmp_path_factory.mktemp("flat") / "flat.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("n", 5)
    w.add_bool("flag", True)
    w.add_array("toks", ["a", "bc", "d"])
    w.add_array("scores", [1.0, 2.0])
    x = data.make("normal", 4, 64, 0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("t.q8", gguf.quants.quantize(x, q8), raw_dtype=q8)
    w.add_tensor("t.f", x[:2].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data_=st.data())
def test_every_file_libggml_accepts_we_accept(flat_base, fuzz_dir, data_):
    """Differential fuzz against llama.cpp's own parser: ours rejects a file libggml accepts only
    for the two checks libggml lacks (UTF-8 of strings, bools other than 0/1). (The converse
    differs on purpose: like gguf-py, ours allows gaps between tensors, libggml does not.)"""
    lib = _libggml_gguf()
    n = 160 if data_.draw(st.booleans()) else len(flat_base)
    mutated = _mutate(flat_base, data_.draw(_mutations(n)))
    p = fuzz_dir / "diff.gguf"
    p.write_bytes(mutated)
    # no_alloc=True: only the header is parsed (with no_alloc=False libggml itself aborts the
    # process on some hostile files while sizing its context). llama.cpp's model loader then
    # checks that each tensor's data lies inside the file; do the same with libggml's numbers.
    ctx = lib.gguf_init_from_file(str(p).encode(), _GgufInitParams(True, None))
    if not ctx:
        return
    try:
        data_offset = lib.gguf_get_data_offset(ctx)
        inside = all(
            data_offset + lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i)
            <= len(mutated)
            for i in range(lib.gguf_get_n_tensors(ctx))
        )
    finally:
        lib.gguf_free(ctx)
    if not inside:
        return
    try:
        _open_bytes(fuzz_dir, mutated, "diff.gguf")
    except fq.FormatError as e:
        assert "UTF-8" in str(e) or "bool value" in str(e), str(e)
