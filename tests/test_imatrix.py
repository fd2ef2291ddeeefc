"""Importance matrices, llama.cpp's definition and file formats.

Peers: gguf-py's GGUFReader reads our imatrix GGUF (the keys, tensor names, shapes and types that
llama.cpp's tools/imatrix writes and llama-quantize reads); the legacy .dat layout is built here
byte by byte from llama.cpp's save_imatrix_legacy; the sums are checked against the model's own
hidden states (transformers, output_hidden_states), not against our hooks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from tiny_llama import make_tiny_llama

import ferroquant as fq
import ferroquant.gguf as fg
from ferroquant import cli
from ferroquant.methods.imatrix import chunk_ids, compute_imatrix, gguf_linear_names
from ferroquant.methods.imatrix_io import (
    ImatrixEntry,
    ImportanceMatrix,
    read_imatrix,
    write_imatrix,
)

TEXT = ("The quick brown fox jumps over the lazy dog. " * 60).strip()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-imatrix"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def test_sums_are_the_squared_inputs_of_each_weight(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    ids = chunk_ids(tok, TEXT, 32, 3, bos=1)
    assert ids.shape == (3, 32) and (ids[:, 0] == 1).all()
    im = compute_imatrix(model, ids, gguf_linear_names(model, "llama"))
    assert "output.weight" not in im.entries  # llama.cpp leaves the head out by default
    assert len(im.entries) == 2 * 7
    want = np.zeros(256)
    with torch.no_grad():
        for k in range(3):
            out = model(input_ids=ids[k : k + 1], output_hidden_states=True)
            x = model.model.layers[1].input_layernorm(out.hidden_states[1])[0].double()
            want += (x * x).sum(0).numpy()
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight"):
        e = im.entries[name]
        assert e.counts.tolist() == [96.0]
        np.testing.assert_allclose(e.in_sum2[0], want, rtol=1e-5)
    assert im.entries["blk.0.ffn_down.weight"].cols == 288
    with_head = compute_imatrix(model, ids, gguf_linear_names(model, "llama"), process_output=True)
    assert with_head.entries["output.weight"].cols == 256


def test_gguf_file_has_llama_cpp_s_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    im = ImportanceMatrix(
        {
            "blk.0.ffn_down.weight": ImatrixEntry(
                rng.random((1, 288), dtype=np.float32), np.array([512.0], np.float32)
            ),
            "blk.0.attn_q.weight": ImatrixEntry(
                rng.random((1, 256), dtype=np.float32), np.array([512.0], np.float32)
            ),
        },
        ["calib.txt"],
        1,
        512,
    )
    path = tmp_path / "imatrix.gguf"
    write_imatrix(im, path)
    r = gguf.GGUFReader(path)
    fields = {f.name: f for f in r.fields.values()}
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["calib.txt"]
    assert fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].contents() == 512
    got = [(t.name, t.shape.tolist(), t.tensor_type.name) for t in r.tensors]
    assert got == [  # sorted by tensor name, as llama.cpp stores them
        ("blk.0.attn_q.weight.in_sum2", [256, 1], "F32"),
        ("blk.0.attn_q.weight.counts", [1, 1], "F32"),
        ("blk.0.ffn_down.weight.in_sum2", [288, 1], "F32"),
        ("blk.0.ffn_down.weight.counts", [1, 1], "F32"),
    ]
    back = read_imatrix(path)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.values(name), e.in_sum2[0] / 512)


def test_legacy_dat_is_read_as_llama_cpp_reads_it(tmp_path):
    # save_imatrix_legacy: n_entries, {len, name, ncall, nval, values = sum2 / count * ncall},
    # then the chunk count and the dataset name
    vals = np.arange(1, 257, dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name
    raw += struct.pack("<ii", 4, 256) + vals.tobytes() + struct.pack("<i", 4)
    raw += struct.pack("<i", 9) + b"calib.txt"
    path = tmp_path / "imatrix.dat"
    path.write_bytes(raw)
    im = read_imatrix(path)
    assert im.chunk_count == 4 and im.datasets == ["calib.txt"]
    np.testing.assert_allclose(im.values("blk.0.attn_q.weight"), vals / 4)
    path.write_bytes(raw[:40])
    with pytest.raises(fq.FormatError, match="blk.0.attn_q.weight"):
        read_imatrix(path)


def test_cli_imatrix_then_convert_and_quantize_use_it_bit_for_bit(tiny, text_file, tmp_path):
    imx = tmp_path / "imatrix.gguf"
    assert cli.main(["imatrix", str(tiny), "--text", str(text_file), "-o", str(imx),
                     "--ctx", "64", "--chunks", "2", "--quiet"]) == 0  # fmt: skip
    im = read_imatrix(imx)
    assert im.chunk_count == 2 and im.chunk_size == 64 and im.datasets == [str(text_file)]
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert cli.main(["convert", str(tiny), str(plain), "--qtype", "q4_k_m", "--quiet"]) == 0
    args = ["convert", str(tiny), str(weighted), "--qtype", "q4_k_m", "--quiet"]
    assert cli.main([*args, "--imatrix", str(imx)]) == 0
    f32 = tmp_path / "f32.gguf"
    assert cli.main(["convert", str(tiny), str(f32), "--qtype", "f32", "--quiet"]) == 0
    requant = tmp_path / "requant.gguf"
    assert cli.main(["quantize", str(f32), str(requant), "--qtype", "q4_k_m",
                     "--imatrix", str(imx), "--quiet"]) == 0  # fmt: skip
    with fg.open(weighted) as w, fg.open(plain) as p, fg.open(f32) as src, fg.open(requant) as r:
        for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.0.ffn_up.weight"):
            t = w.tensors[name]
            want = fq.quantize(src.tensors[name].numpy(), t.qtype, im.values(name))
            np.testing.assert_array_equal(t.data, np.asarray(want.data).reshape(-1))
            np.testing.assert_array_equal(r.tensors[name].data, t.data)
            assert t.qtype in ("q4_k", "q5_0")  # quantizers that take the imatrix
            assert not np.array_equal(p.tensors[name].data, t.data), name


def test_an_imatrix_of_another_model_is_named_and_nothing_is_written(tiny, tmp_path, capsys):
    bad = ImportanceMatrix(
        {"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 128), np.float32), np.ones(1, np.float32))}
    )
    write_imatrix(bad, tmp_path / "bad.gguf")
    out = tmp_path / "out.gguf"
    rc = cli.main(["convert", str(tiny), str(out), "--qtype", "q4_0", "--quiet",
                   "--imatrix", str(tmp_path / "bad.gguf")])  # fmt: skip
    assert rc == 2 and not out.exists()
    assert "blk.0.attn_q.weight has 128 columns, the model's has 256" in capsys.readouterr().err
    bad.entries = {"blk.7.attn_q.weight": bad.entries["blk.0.attn_q.weight"]}
    write_imatrix(bad, tmp_path / "bad.gguf")
    assert cli.main(["convert", str(tiny), str(out), "--qtype", "q4_0", "--quiet",
                     "--imatrix", str(tmp_path / "bad.gguf")]) == 2  # fmt: skip
    assert "tensor blk.7.attn_q.weight is not a weight of this model" in capsys.readouterr().err
    model_file = tmp_path / "model.gguf"
    assert cli.main(["convert", str(tiny), str(model_file), "--qtype", "q8_0", "--quiet"]) == 0
    assert cli.main(["convert", str(tiny), str(out), "--qtype", "q4_0", "--quiet",
                     "--imatrix", str(model_file)]) == 2  # fmt: skip
    assert "not 'imatrix'" in capsys.readouterr().err and not out.exists()
    # llama-quantize's path (GGUF in, GGUF out) refuses it the same way
    assert cli.main(["quantize", str(model_file), str(out), "--qtype", "q4_0", "--quiet",
                     "--imatrix", str(tmp_path / "bad.gguf")]) == 2  # fmt: skip
    assert "tensor blk.7.attn_q.weight is not a weight of this model" in capsys.readouterr().err
    assert not out.exists()
