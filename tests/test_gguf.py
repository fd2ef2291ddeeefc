"""GGUF round trips against gguf-py (the Python reference reader/writer of llama.cpp) in both
directions, on fresh random tensors of every distribution in tests/data.py, plus the properties
of the reader (zero-copy read-only views, v2, alignment) and the streaming atomic writer."""

from __future__ import annotations

import ctypes
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
import ferroquant.gguf as fg

import data
import peers

gguf = peers.require("gguf")
GVT = gguf.GGUFValueType
GQT = gguf.GGMLQuantizationType

# (gguf-py add_* method, value, our type name); every scalar type at its extremes.
SCALARS = [
    ("add_uint8", 255, "uint8"),
    ("add_int8", -128, "int8"),
    ("add_uint16", 65535, "uint16"),
    ("add_int16", -32768, "int16"),
    ("add_uint32", 2**32 - 1, "uint32"),
    ("add_int32", -(2**31), "int32"),
    ("add_float32", 0.1, "float32"),
    ("add_uint64", 2**64 - 1, "uint64"),
    ("add_int64", -(2**63), "int64"),
    ("add_float64", -1.5e300, "float64"),
    ("add_bool", True, "bool"),
    ("add_string", "héllo, wörld ✓ \x00 inside", "string"),
]
NUMERIC_ARRAY_TYPES = [
    (GVT.UINT8, np.uint8), (GVT.INT8, np.int8), (GVT.UINT16, np.uint16), (GVT.INT16, np.int16),
    (GVT.UINT32, np.uint32), (GVT.INT32, np.int32), (GVT.FLOAT32, np.float32),
    (GVT.UINT64, np.uint64), (GVT.INT64, np.int64), (GVT.FLOAT64, np.float64),
    (GVT.BOOL, np.bool_),
]  # fmt: skip
# Tensor types gguf-py can quantize itself (plain floats pass through its quantize()).
PY_QTYPES = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _rand_array(rng: np.random.Generator, dtype, n: int) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(n) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(n).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)


def _gguf_py_file(path: pathlib.Path, seed: int, tensors: dict[str, tuple[np.ndarray, str]]):
    """A file written by gguf-py with every value type, nested arrays and the given tensors
    (quantized by gguf.quants). Returns the metadata we expect to read back and the bytes."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    expect: dict[str, tuple[str, object]] = {"general.architecture": ("string", "llama")}
    for method, val, tname in SCALARS:
        getattr(w, method)(f"s.{tname}", val)
        expect[f"s.{tname}"] = (tname, val)
    for vt, dtype in NUMERIC_ARRAY_TYPES:
        arr = _rand_array(rng, dtype, int(rng.integers(1, 40)))
        items = [bool(x) for x in arr] if dtype == np.bool_ else arr.tolist()
        w.add_key_value(f"a.{vt.name}", items, GVT.ARRAY, sub_type=vt)
        expect[f"a.{vt.name}"] = (f"array[{vt.name.lower()}]", arr)
    tokens = ["<s>", "", "ünïcode", "a b", "\n"] * int(rng.integers(1, 5))
    w.add_array("a.strings", tokens)
    expect["a.strings"] = ("array[string]", tokens)
    w.add_key_value("a.nested", [[1, 2, 3], ["x", "yz"], [[0.5], [True, False]]], GVT.ARRAY)
    expect["a.nested"] = (
        "array[array]",
        [np.array([1, 2, 3], np.int32), ["x", "yz"], [np.array([0.5], np.float32),
                                                      np.array([True, False])]],
    )  # fmt: skip
    quantized = {}
    for name, (x, qtype) in tensors.items():
        q = gguf.quants.quantize(x, peers.gguf_qtype(qtype))
        quantized[name] = q
        w.add_tensor(name, q, raw_dtype=peers.gguf_qtype(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect, quantized


def _same_value(got, want) -> bool:
    if isinstance(want, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and (np.array_equal(got, want) or got.tobytes() == want.tobytes())
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same_value(g, w) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, float):
        return isinstance(got, float) and (got == want or np.float32(got) == np.float32(want))
    return type(got) is type(want) and got == want


@pytest.mark.parametrize("dist", data.DISTRIBUTIONS)
def test_reads_files_gguf_py_writes(tmp_path, dist):
    seed = data.DISTRIBUTIONS.index(dist)
    tensors = {
        f"blk.{i}.{qtype}": (data.make(dist, rows, 64 * cols, seed + i), qtype)
        for i, (qtype, rows, cols) in enumerate(
            zip(PY_QTYPES, [1, 3, 7, 2, 5, 4, 6, 8], [1, 2, 3, 4, 1, 2, 3, 1], strict=True)
        )
    }
    path = tmp_path / "py.gguf"
    expect, quantized = _gguf_py_file(path, seed, tensors)
    reference = gguf.GGUFReader(str(path))
    with fg.open(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.data_offset == reference.data_offset
        assert list(f.metadata) == [k for k in reference.fields if not k.startswith("GGUF.")]
        for key, (tname, want) in expect.items():
            assert f.metadata_types[key] == tname, key
            assert _same_value(f.metadata[key], want), (key, f.metadata[key], want)
            assert f.metadata_offsets[key] == reference.fields[key].offset
        assert [t.name for t in reference.tensors] == list(f.tensors)
        for rt in reference.tensors:
            t = f.tensors[rt.name]
            x, qtype = tensors[rt.name]
            assert t.qtype == qtype and t.ggml_type == int(rt.tensor_type)
            assert t.shape == x.shape  # numpy order: gguf-py's dims reversed
            assert list(reversed(t.shape)) == rt.shape.tolist()
            assert t.data_offset == rt.data_offset and t.nbytes == rt.n_bytes
            assert t.n_elements == rt.n_elements
            want = np.asarray(quantized[rt.name]).reshape(-1).view(np.uint8)
            assert np.array_equal(t.data, want), peers.first_difference(t.data, want, 1)
            assert np.array_equal(t.data, np.asarray(rt.data).reshape(-1).view(np.uint8))
            ref = gguf.quants.dequantize(quantized[rt.name], peers.gguf_qtype(qtype))
            np.testing.assert_array_equal(t.dequantize(), ref.astype(np.float32))


@pytest.mark.parametrize("dist", data.DISTRIBUTIONS)
def test_gguf_py_reads_files_we_write(tmp_path, dist):
    seed = 100 + data.DISTRIBUTIONS.index(dist)
    rng = np.random.default_rng(seed)
    path = tmp_path / "ours.gguf"
    x = data.make(dist, 6, 128, seed)
    tensors = {
        "f32": x,
        "f16": x.astype(np.float16),
        "f64": x.astype(np.float64)[:2],
        "i32": rng.integers(-(2**31), 2**31, (3, 5), dtype=np.int32),
        "q8_0": fq.quantize(x, "q8_0"),
        "q4_0": fq.quantize(x[:3], "q4_0"),
        "q5_1": fq.quantize(x[:1], "q5_1"),
        "vec": x[0].copy(),
    }
    arrays = {vt: _rand_array(rng, dt, int(rng.integers(1, 30))) for vt, dt in NUMERIC_ARRAY_TYPES}
    with fg.GGUFWriter(path, "llama") as w:
        for method, val, tname in SCALARS:
            getattr(w, method)(f"s.{tname}", val)
        for vt, arr in arrays.items():
            w.add_array(f"a.{vt.name}", arr)
        w.add_array("a.strings", ["a", "", "ü"])
        w.add_array("a.nested", [[1, 2], ["x"], [[0.25, 0.5]]])
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    r = gguf.GGUFReader(str(path))
    assert r.fields["GGUF.version"].contents() == 3
    assert r.fields["general.architecture"].contents() == "llama"
    for _, val, tname in SCALARS:
        field = r.fields[f"s.{tname}"]
        assert field.types == [GVT[tname.upper()]]
        got = field.contents()
        assert got == val or (tname == "float32" and np.float32(got) == np.float32(val))
    for vt, arr in arrays.items():
        field = r.fields[f"a.{vt.name}"]
        assert field.types == [GVT.ARRAY, vt]
        assert np.array_equal(np.array(field.contents(), dtype=arr.dtype), arr)
    assert r.fields["a.strings"].contents() == ["a", "", "ü"]
    nested = r.fields["a.nested"]
    assert nested.types[:2] == [GVT.ARRAY, GVT.ARRAY]
    # gguf-py's contents() flattens nested arrays (and mangles their strings), so compare the
    # raw parts it parsed with the encoding written out by hand from the GGUF spec.
    want = struct.pack("<IQ", GVT.ARRAY, 3)
    want += struct.pack("<IQii", GVT.INT32, 2, 1, 2)
    want += struct.pack("<IQQ", GVT.STRING, 1, 1) + b"x"
    want += struct.pack("<IQ", GVT.ARRAY, 1) + struct.pack("<IQff", GVT.FLOAT32, 2, 0.25, 0.5)
    assert b"".join(p.tobytes() for p in nested.parts[3:]) == want
    assert [t.name for t in r.tensors] == list(tensors)
    for rt in r.tensors:
        src = tensors[rt.name]
        want = src.data if isinstance(src, fq.QTensor) else np.ascontiguousarray(src).view(np.uint8)
        assert rt.data_offset % 32 == 0
        assert tuple(reversed(rt.shape.tolist())) == tuple(src.shape)
        assert np.array_equal(np.asarray(rt.data).reshape(-1).view(np.uint8), want.reshape(-1))
        if isinstance(src, fq.QTensor):
            assert rt.tensor_type == GQT(peers.GGML_TYPE[src.qtype])
            ref = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type)
            np.testing.assert_array_equal(ref.reshape(src.shape), fq.dequantize(src))


def test_rewriting_a_gguf_py_file_is_byte_identical(tmp_path):
    x = data.make("normal", 4, 96, 7)
    src = tmp_path / "src.gguf"
    _gguf_py_file(src, 3, {"w.q8_0": (x, "q8_0"), "w.f16": (x, "f16"), "w.q4_1": (x, "q4_1")})
    out = tmp_path / "copy.gguf"
    with fg.open(src) as f:
        fg.write_gguf(
            out,
            f.metadata,
            {n: t.to_qtensor() for n, t in f.tensors.items()},
            types=f.metadata_types,
        )
    assert out.read_bytes() == src.read_bytes()


def test_version_2_and_custom_alignment(tmp_path):
    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    x = data.make("outliers", 3, 32, 1)
    w.add_tensor("a", x)
    w.add_tensor("b", x[:1].copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(path.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")  # v2 has the same layout as v3
    path.write_bytes(bytes(raw))
    with fg.open(path) as f:
        assert f.version == 2 and f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensors["b"].data_offset - f.data_offset == 384  # 3*32*4 padded to 64
        np.testing.assert_array_equal(f.tensors["a"].numpy(), x)
        np.testing.assert_array_equal(f.tensors["b"].dequantize(), x[:1])


def test_data_is_a_zero_copy_read_only_view(tmp_path):
    path = tmp_path / "z.gguf"
    x = data.make("normal", 8, 64, 2)
    fg.write_gguf(path, {"general.architecture": "llama"}, {"w": x})
    f = fg.open(path)
    t = f.tensors["w"]
    a, b = t.data, t.data
    assert a.ctypes.data == b.ctypes.data  # the same mapped bytes, not copies
    assert not a.flags.writeable and not a.flags.owndata
    with pytest.raises(ValueError):
        a.flags.writeable = True
    with pytest.raises(ValueError):
        a[0] = 1
    qt = t.to_qtensor()
    assert qt.data.ctypes.data == a.ctypes.data
    f.close()
    # Views taken before close keep the map alive; the file object itself refuses new ones.
    np.testing.assert_array_equal(a.view(np.float32).reshape(x.shape), x)
    with pytest.raises(ValueError):
        _ = t.data
    # Rewriting the path renames a new file over it: the old map (and `a`) still sees old bytes.
    fg.write_gguf(path, {"general.architecture": "llama"}, {"w": -x})
    np.testing.assert_array_equal(a.view(np.float32).reshape(x.shape), x)
    with fg.open(path) as f2:
        np.testing.assert_array_equal(f2.tensors["w"].numpy(), -x)


def test_streaming_writer_one_tensor_at_a_time(tmp_path):
    path = tmp_path / "s.gguf"
    shapes = [(4, 64), (2, 32), (1, 256)]
    w = fg.GGUFWriter(path, "llama")
    for i, s in enumerate(shapes):
        w.add_tensor_info(f"t{i}", s, "q8_0")
    w.write_header_to_file()
    assert not path.exists()  # nothing under the target name until close()
    made = []
    for i, s in enumerate(shapes):  # produce each tensor only when it is written
        x = data.make("heavy_tailed", *s, seed=i)
        made.append(fq.quantize(x, "q8_0"))
        w.write_tensor_data(made[-1])
    w.close()
    with fg.open(path) as f:
        for i, qt in enumerate(made):
            t = f.tensors[f"t{i}"]
            assert t.shape == qt.shape and t.qtype == "q8_0"
            assert np.array_equal(t.data, qt.data)


def test_flush_puts_the_tensors_written_so_far_in_the_temporary_file(tmp_path):
    """What `convert --ray`'s resume counts on: after flush(), the temporary file holds the
    header and every tensor written (and its padding), up to where the next tensor starts."""
    path = tmp_path / "f.gguf"
    w = fg.GGUFWriter(path, "llama")
    for i in range(3):
        w.add_tensor_info(f"t{i}", (1, 100 + i), "f32")
    ends = []
    for i in range(3):
        w.write_tensor_data(np.full((1, 100 + i), i, np.float32))
        w.flush()
        (tmp,) = tmp_path.glob(".f.gguf.*.tmp")
        ends.append(tmp.stat().st_size)
    assert not path.exists()
    w.close()
    with fg.open(path) as f:
        starts = [f.tensors[f"t{i}"].data_offset for i in range(3)]
        assert ends[:2] == starts[1:]
        assert ends[2] == f.file_size


def test_torch_tensors_and_bf16(tmp_path):
    torch = peers.require("torch")
    path = tmp_path / "t.gguf"
    x = torch.from_numpy(data.make("huge", 3, 64, 5))
    fg.write_gguf(path, {}, {"bf16": x.to(torch.bfloat16), "f32": x, "f16": x.half()})
    r = gguf.GGUFReader(str(path))
    assert [t.tensor_type for t in r.tensors] == [GQT.BF16, GQT.F32, GQT.F16]
    with fg.open(path) as f:
        bf = f.tensors["bf16"]
        assert bf.qtype == "bf16"
        np.testing.assert_array_equal(bf.dequantize(), x.to(torch.bfloat16).float().numpy())
        np.testing.assert_array_equal(f.tensors["f16"].dequantize(), x.half().float().numpy())


def test_writer_errors_leave_nothing_behind(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous model")
    x = data.make("normal", 2, 64, 0)
    # A failure mid-way (after the header and one tensor) leaves the old file and no temp file.
    with pytest.raises(RuntimeError):
        with fg.GGUFWriter(path, "llama") as w:
            w.add_tensor_info("a", (2, 64), "f32")
            w.add_tensor_info("b", (2, 64), "f32")
            w.write_header_to_file()
            w.write_tensor_data(x)
            raise RuntimeError("the producer of tensor b crashed")
    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
    # Closing before every declared tensor is written is an error too.
    w = fg.GGUFWriter(path, "llama")
    w.add_tensor_info("a", (2, 64), "f32")
    with pytest.raises(ValueError, match="tensors written"):
        w.close()
    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
    # Wrong sizes, types and shapes are refused before anything is written.
    w = fg.GGUFWriter(path, "llama")
    w.add_tensor_info("a", (2, 64), "f32")
    with pytest.raises(ValueError):
        w.write_tensor_data(x[:1])
    with pytest.raises(ValueError):
        w.write_tensor_data(fq.quantize(x, "q8_0"))
    w.abort()
    with pytest.raises(ValueError):
        fg.GGUFWriter(path).add_tensor_info("q", (2, 48), "q4_0")  # 48 is not whole blocks
    with pytest.raises(ValueError):
        nf4 = fq.QTensor(qtype="nf4", shape=(2, 64), data=np.zeros(64, np.uint8), block_size=64)
        fg.write_gguf(path, {}, {"nf4": nf4})  # nf4 has no ggml type
    with pytest.raises(ValueError):
        fg.write_gguf(path, {"general.alignment": 48}, {}, types={"general.alignment": "uint32"})
    with pytest.raises(ValueError):
        fg.write_gguf(path, {"e": []}, {})  # an empty list has no element type
    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_metadata_type_inference_and_hints(tmp_path):
    path = tmp_path / "m.gguf"
    md = {
        "i": 5, "big": 2**40, "f": 0.5, "b": False, "s": "x", "u8": np.uint8(7),
        "ints": [1, 2, 2**33], "floats": [1.0, 2.5], "np": np.arange(3, dtype=np.int16),
        "empty": [], "bytes": "bytés".encode(), "raw": b"\x00\xff",
    }  # fmt: skip
    # As in gguf-py: bytes are a string, unless the type says array (then uint8 items).
    fg.write_gguf(path, md, {}, types={"empty": "array[uint32]", "i": "uint16", "raw": "array"})
    with fg.open(path) as f:
        assert f.metadata_types == {
            "i": "uint16", "big": "int64", "f": "float32", "b": "bool", "s": "string",
            "u8": "uint8", "ints": "array[int64]", "floats": "array[float32]",
            "np": "array[int16]", "empty": "array[uint32]", "bytes": "string",
            "raw": "array[uint8]",
        }  # fmt: skip
        assert f.metadata["big"] == 2**40 and f.metadata["b"] is False
        assert f.metadata["bytes"] == "bytés" and f.metadata["raw"].tolist() == [0, 255]
        assert f.tensors == {}


def test_inspect_lists_metadata_tensors_and_bits_per_weight(tmp_path):
    path = tmp_path / "i.gguf"
    x = data.make("normal", 4, 256, 0)
    fg.write_gguf(
        path,
        {"general.architecture": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(100)]},
        {"w.q8_0": fq.quantize(x, "q8_0"), "w.f32": x[:1].copy()},
    )
    text = fg.inspect(path)
    assert "GGUF v3" in text and "general.architecture" in text and "'llama'" in text
    assert "[100 items: 't0', 't1', 't2', 't3', ...]" in text
    assert "w.q8_0" in text and "4x256" in text and "1088" in text and "1024" in text
    bpw = 8 * (4 * 8 * 34 + 1024) / (4 * 256 + 256)
    assert f"{bpw:.3f} bits per weight" in text


@settings(max_examples=15, deadline=None)
@given(
    qtype=st.sampled_from(PY_QTYPES),
    rows=st.integers(1, 5),
    blocks=st.integers(1, 4),
    dist=st.sampled_from(data.DISTRIBUTIONS),
    seed=st.integers(0, 2**31),
    align=st.sampled_from([None, 1, 8, 64, 4096]),
)
def test_random_files_round_trip_with_gguf_py(tmp_path_factory, qtype, rows, blocks, dist, seed,
                                              align):  # fmt: skip
    path = tmp_path_factory.mktemp("h") / "r.gguf"
    x = data.make(dist, rows, 32 * blocks, seed)
    q = gguf.quants.quantize(x, peers.gguf_qtype(qtype))
    with fg.GGUFWriter(path, alignment=align) as w:
        # gguf.quants returns float arrays for f32/f16, uint16 bits for bf16, block bytes else
        w.add_tensor("t", q, raw_dtype=None if qtype in ("f32", "f16") else qtype)
        w.write_tensors_to_file()
    r = gguf.GGUFReader(str(path))
    assert r.alignment == (align or 32)
    rt = r.tensors[0]
    assert rt.tensor_type == peers.gguf_qtype(qtype)
    assert np.array_equal(np.asarray(rt.data).reshape(-1).view(np.uint8),
                          np.asarray(q).reshape(-1).view(np.uint8))  # fmt: skip
    with fg.open(path) as f:
        t = f.tensors["t"]
        assert t.shape == x.shape and t.data_offset == rt.data_offset
        ref = gguf.quants.dequantize(q, peers.gguf_qtype(qtype)).astype(np.float32)
        np.testing.assert_array_equal(t.dequantize(), ref.reshape(x.shape))


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _libggml_gguf():
    """libggml's own GGUF parser (gguf.cpp in libggml-base, from llama-cpp-python's wheel)."""
    lib = peers.libggml()
    P, I64, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "gguf_init_from_file": (P, [ctypes.c_char_p, _GgufInitParams]),
        "gguf_free": (None, [P]),
        "gguf_get_version": (ctypes.c_uint32, [P]),
        "gguf_get_alignment": (SZ, [P]),
        "gguf_get_data_offset": (SZ, [P]),
        "gguf_get_n_kv": (I64, [P]),
        "gguf_get_key": (ctypes.c_char_p, [P, I64]),
        "gguf_get_kv_type": (ctypes.c_int, [P, I64]),
        "gguf_get_val_data": (P, [P, I64]),
        "gguf_get_val_str": (ctypes.c_char_p, [P, I64]),
        "gguf_get_arr_type": (ctypes.c_int, [P, I64]),
        "gguf_get_arr_n": (SZ, [P, I64]),
        "gguf_get_arr_data": (P, [P, I64]),
        "gguf_get_arr_str": (ctypes.c_char_p, [P, I64, SZ]),
        "gguf_get_n_tensors": (I64, [P]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [P, I64]),
        "gguf_get_tensor_offset": (SZ, [P, I64]),
        "gguf_get_tensor_type": (ctypes.c_int, [P, I64]),
        "gguf_get_tensor_size": (SZ, [P, I64]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _libggml_value(lib, ctx, i: int):
    t = lib.gguf_get_kv_type(ctx, i)
    if t == GVT.STRING:
        return lib.gguf_get_val_str(ctx, i).decode()
    if t == GVT.ARRAY:
        et, n = lib.gguf_get_arr_type(ctx, i), lib.gguf_get_arr_n(ctx, i)
        if et == GVT.STRING:
            return [lib.gguf_get_arr_str(ctx, i, j).decode() for j in range(n)]
        dtype = np.dtype(fg._NUMPY_OF_VALUE_TYPE[et])
        buf = ctypes.string_at(lib.gguf_get_arr_data(ctx, i), n * dtype.itemsize)
        return np.frombuffer(buf, dtype)
    dtype = np.dtype(fg._NUMPY_OF_VALUE_TYPE[t])
    return np.frombuffer(ctypes.string_at(lib.gguf_get_val_data(ctx, i), dtype.itemsize), dtype)[0]


@pytest.mark.parametrize("dist", ["normal", "outliers"])
def test_libggml_reads_files_we_write(tmp_path, dist):
    """llama.cpp's C parser accepts our files and sees the same keys, values and tensors (it does
    not support nested arrays, so this file has none)."""
    lib = _libggml_gguf()
    rng = np.random.default_rng(5)
    x = data.make(dist, 4, 256, 3)
    path = tmp_path / "ours.gguf"
    with fg.GGUFWriter(path, "llama", alignment=64) as w:
        for method, val, tname in SCALARS:
            getattr(w, method)(f"s.{tname}", val)
        for vt, dt in NUMERIC_ARRAY_TYPES:
            w.add_array(f"a.{vt.name}", _rand_array(rng, dt, 9))
        w.add_array("a.strings", ["<s>", "", "ü"])
        for name, t in {"f32": x, "f16": x.astype(np.float16), "q8_0": fq.quantize(x, "q8_0"),
                        "q4_0": fq.quantize(x[:1], "q4_0")}.items():  # fmt: skip
            w.add_tensor(name, t)
        w.write_tensors_to_file()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    assert ctx, "libggml refused the file"
    try:
        with fg.open(path) as f:
            assert lib.gguf_get_version(ctx) == 3
            assert lib.gguf_get_alignment(ctx) == f.alignment == 64
            assert lib.gguf_get_data_offset(ctx) == f.data_offset
            assert lib.gguf_get_n_kv(ctx) == len(f.metadata)
            for i, key in enumerate(f.metadata):
                assert lib.gguf_get_key(ctx, i).decode() == key
                want = f.metadata[key]
                got = _libggml_value(lib, ctx, i)
                if isinstance(want, np.ndarray):
                    assert got.dtype == want.dtype and np.array_equal(got, want), key
                elif isinstance(want, float):
                    assert got == want or np.float32(got) == np.float32(want), key
                elif isinstance(want, str):  # the C API hands out NUL-terminated strings
                    assert got == want.split("\0")[0], key
                else:
                    assert got == want, key
            assert lib.gguf_get_n_tensors(ctx) == len(f.tensors)
            for i, t in enumerate(f.tensors.values()):
                assert lib.gguf_get_tensor_name(ctx, i).decode() == t.name
                assert lib.gguf_get_tensor_type(ctx, i) == t.ggml_type
                assert lib.gguf_get_tensor_size(ctx, i) == t.nbytes
                assert lib.gguf_get_tensor_offset(ctx, i) + f.data_offset == t.data_offset
    finally:
        lib.gguf_free(ctx)


def test_a_killed_writer_never_leaves_a_truncated_target(tmp_path):
    """A process that dies mid-write (no cleanup runs) leaves the old file under the target name;
    only a hidden temporary file remains beside it."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous model")
    script = (
        "import os, sys, numpy as np, ferroquant.gguf as fg\n"
        "w = fg.GGUFWriter(sys.argv[1], 'llama')\n"
        "w.add_tensor_info('a', (64, 64), 'f32')\n"
        "w.add_tensor_info('b', (64, 64), 'f32')\n"
        "w.write_tensor_data(np.ones((64, 64), np.float32))\n"
        "os._exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert path.read_bytes() == b"previous model"
    leftovers = [n for n in os.listdir(tmp_path) if n != "m.gguf"]
    assert all(n.startswith(".m.gguf.") and n.endswith(".tmp") for n in leftovers), leftovers
