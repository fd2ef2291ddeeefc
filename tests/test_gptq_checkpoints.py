"""GPTQ and AWQ checkpoint folders both ways, against the peers LIVE on a tiny random Llama:

- GPTQModel 7.7.0 quantizes (GPTQ, 4-bit g64, symmetric and with zero points) and saves;
  `ferroquant.load_quantized` loads the folder: every Linear's dequantized weight equals
  GPTQModel's own `dequantize_weight()` bit for bit (fp16 model), and the logits agree.
- GPTQModel's AWQ (GEMM format) folder loads the same way (logits: its AWQ kernel has no
  `dequantize_weight`).
- `ferroquant convert --format gptq|awq` writes a folder; transformers loads it (through
  optimum + GPTQModel, which pick their CPU kernels), and so does `GPTQModel.load` on the CPU:
  the same exact weights and close logits.

The logits tolerance: ours run in float32 with q16 activations, the peer in float16 (rounding of
about 2^-11 relative per operation over two layers): 5e-3 on logits of magnitude about 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ferroquant as fq

from peers import require

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.model_peers

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
VOCAB = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random Llama (hidden 128, ffn 256) in float16 with a word-level tokenizer."""
    require("transformers")
    from tiny_llama import write_small_word_llama

    return write_small_word_llama(tmp_path_factory.mktemp("tiny"), VOCAB)


def _quant_linears(model):
    from ferroquant.nn import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _same_weights_and_logits(ours, peer, weights: bool = True) -> int:
    mods = _quant_linears(ours)
    assert len(mods) == 14  # 7 Linears a layer, lm_head kept in float
    for name, mod in mods.items() if weights else ():
        pm = peer.get_submodule(name)
        if not hasattr(pm, "dequantize_weight"):
            # transformers' AWQ loader takes GPTQModel's CPU kernel by what the CPU has: without
            # AVX-512 (session 20's Zen 3) TorchAtenAwqLinear, which has no dequantize_weight():
            # the logits below are the check there
            assert type(pm).__name__ == "TorchAtenAwqLinear", type(pm)
            continue
        theirs = pm.dequantize_weight().T.float()
        mine = mod.dequantized_weight()
        # the peer computes s * (q - z) in fp16: our exact f32 product rounds to the same value
        assert torch.equal(mine.half().float(), theirs), name
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits.float(), peer(ids).logits.float()
    assert (a - b).abs().max().item() < 5e-3
    return len(mods)


@pytest.mark.parametrize("sym", [True, False])
def test_gptqmodel_checkpoint_loads_into_quantlinear_exactly(tiny, tmp_path, monkeypatch, sym):
    require("gptqmodel")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes its logs/ into the working folder
    from gptqmodel import GPTQModel, QuantizeConfig

    g = torch.Generator().manual_seed(2)
    calib = [{"input_ids": torch.randint(0, VOCAB, (64,), generator=g).tolist(),
              "attention_mask": [1] * 64} for _ in range(8)]  # fmt: skip
    qc = QuantizeConfig(bits=4, group_size=64, sym=sym, desc_act=False)
    model = GPTQModel.load(str(tiny), qc, device="cpu")
    model.quantize(calib, batch_size=1)
    out = tmp_path / "gptqmodel"
    model.save(str(out))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq"

    ours = fq.load_quantized(out)
    assert {m.qtype for m in _quant_linears(ours).values()} == {
        "int4_g64_sym" if sym else "int4_g64"
    }
    peer = GPTQModel.load(str(out), device="cpu", dtype=torch.float16).model
    _same_weights_and_logits(ours, peer)


def test_gptqmodel_awq_checkpoint_loads_into_quantlinear(tiny, tmp_path, monkeypatch):
    """GPTQModel's AWQ (4-bit g64 with zero points, GEMM format: int32 packed along the output
    in the [0,2,4,6,1,3,5,7] order) into `load_quantized`: the logits of GPTQModel's own model
    of the folder (its AWQ CPU kernel has no `dequantize_weight`, so logits only)."""
    require("gptqmodel")
    monkeypatch.chdir(tmp_path)
    from gptqmodel import AWQConfig, GPTQModel

    g = torch.Generator().manual_seed(3)
    calib = [{"input_ids": torch.randint(0, VOCAB, (64,), generator=g).tolist(),
              "attention_mask": [1] * 64} for _ in range(8)]  # fmt: skip
    model = GPTQModel.load(str(tiny), AWQConfig(bits=4, group_size=64, sym=False), device="cpu")
    model.quantize(calib, batch_size=1)
    out = tmp_path / "gptqmodel-awq"
    model.save(str(out))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq"

    ours = fq.load_quantized(out)
    assert {m.qtype for m in _quant_linears(ours).values()} == {"int4_g64"}
    peer = GPTQModel.load(str(out), device="cpu", dtype=torch.float16).model
    _same_weights_and_logits(ours, peer, weights=False)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_transformers_loads_what_convert_writes(tiny, tmp_path, monkeypatch, fmt):
    require("gptqmodel")
    require("optimum")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes its logs/ into the working folder
    from gptqmodel import GPTQModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / fmt
    cmd = [sys.executable, "-m", "ferroquant", "convert", str(tiny), str(out), "--format", fmt,
           "--bits", "4", "--group-size", "64", "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == fmt and cfg["bits"] == 4 and cfg["group_size"] == 64
    assert (out / "tokenizer.json").is_file()
    peer = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu")
    ours = fq.load_quantized(out)
    _same_weights_and_logits(ours, peer)
    # GPTQModel itself loads it on the CPU too (its own loader and kernel choice; its AWQ CPU
    # kernel, TorchAtenAwqLinear, has no dequantize_weight(): the logits only there)
    direct = GPTQModel.load(str(out), device="cpu", dtype=torch.float16).model
    _same_weights_and_logits(ours, direct, weights=fmt == "gptq")
    # and the checkpoint holds exactly what our RTN quantizer gives the float weights
    from safetensors.torch import load_file

    src = load_file(str(tiny / "model.safetensors"))
    q = _quant_linears(ours)["model.layers.1.mlp.down_proj"]
    want = fq.quantize(src["model.layers.1.mlp.down_proj.weight"], q.qtype)
    assert np.array_equal(np.asarray(q.qweight), want.data)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_convert_writes_awq_s_result_as_an_awq_checkpoint(tiny, tmp_path, monkeypatch, method):
    """`convert --format awq --method awq`: AWQ's scales are folded into the norms (float16 tensors
    of the folder) and the Linears quantized after them; transformers reads the folder to the same
    weights and logits as `load_quantized`."""
    require("gptqmodel")
    require("optimum")
    monkeypatch.chdir(tmp_path)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{4 + (7 * i) % 250}" for i in range(2000)))
    out = tmp_path / "awq"
    cmd = [sys.executable, "-m", "ferroquant", "convert", str(tiny), str(out), "--format", "awq",
           "--bits", "4", "--group-size", "64", "--method", method, "--calib", str(text),
           "--calib-samples", "4", "--calib-len", "64", "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    src, got = load_file(str(tiny / "model.safetensors")), load_file(str(out / "model.safetensors"))
    norms = [k for k in src if k.endswith("layernorm.weight")]
    assert len(norms) == 4 and any(not torch.equal(src[k], got[k]) for k in norms)
    peer = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu")
    _same_weights_and_logits(fq.load_quantized(out), peer)


def test_convert_format_refuses_bad_input_without_writing(tiny, tmp_path):
    def run(*extra, src=tiny):
        out = tmp_path / "x"
        cmd = [sys.executable, "-m", "ferroquant", "convert", str(src), str(out), *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert r.returncode != 0 and not out.exists(), r.stdout
        return r.stderr

    assert "no grouped integer format" in run("--format", "gptq", "--group-size", "96")
    wide = tmp_path / "wide"  # rows of 576 (SmolLM2's): groups of 128 do not divide them
    wide.mkdir()
    cfg = json.loads((tiny / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 576}))
    err = run("--format", "gptq", "--group-size", "128", src=wide)
    assert "group size 128 does not divide the rows of 576" in err
    assert "AWQ" in run("--format", "awq", "--bits", "3", "--group-size", "64")
    assert "unknown method 'awq2'" in run("--format", "gptq", "--method", "awq2")


def test_load_quantized_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "hqq"}})
    )
    with pytest.raises(fq.FormatError, match="quant_method 'hqq'"):
        fq.load_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(fq.FormatError, match="no quantization_config"):
        fq.load_quantized(tmp_path)
