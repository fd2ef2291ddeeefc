"""compressed-tensors checkpoints (llm-compressor's output) into QuantLinear, against the peer LIVE:

- per tensor (hypothesis, fast): codes, scales and zero points packed by compressed-tensors' own
  `pack_to_int32`, decoded by ferroquant (models/compressed.py), dequantize bit for bit to
  compressed-tensors' own `PackedQuantizationCompressor.decompress` (2/3/4/8 bits, groups
  32/64/128 and per channel, symmetric and with zero points where ferroquant has the qtype);
- per model (model_peers): llm-compressor 0.14 itself quantizes a tiny fp16 Llama (GPTQ W4A16
  g64; RTN with zero points g32; RTN W8A16 per channel) and saves; `ferroquant.load_quantized`
  loads each folder without requantizing: every Linear's dequantized weight equals the peer's
  decompression bit for bit (our exact float32 `scale * (c - z)` rounded to the scale's fp16, as
  the peer computes it in fp16), and the logits agree with the fp16 model holding the peer's
  decompressed weights and (symmetric schemes) with transformers loading the same folder through
  compressed-tensors (5e-3 on logits of magnitude about 1: float32 + q16 activations against the
  peer's float16, as in tests/test_gptq_checkpoints.py);
- refusals: act-order groups, activation quantization, other formats: one FormatError each."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
import ferroquant.models.packed_int

from peers import require

torch = pytest.importorskip("torch")
VOCAB = 256


def _peer_decompress(t: dict, bits: int, group: int, sym: bool) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "group" if group else "channel"}  # fmt: skip
    if group:
        weights["group_size"] = group
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.sampled_from([32, 64, 128, 0]),
    sym=st.booleans(),
    n=st.integers(1, 40),
    k_groups=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
)
def test_packed_tensors_decode_like_the_peer(bits, group, sym, n, k_groups, seed, dtype):
    require("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    from ferroquant.models import compressed

    if bits == 8 and not sym:
        sym = True  # 8-bit grouped integers are symmetric only (no ferroquant qtype otherwise)
    k = (group or 32) * k_groups
    groups = k // group if group else 1
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).to(getattr(torch, dtype))
    t = {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale,
         "weight_shape": torch.tensor([n, k])}  # fmt: skip
    if not sym:
        zp = torch.randint(lo, hi + 1, (n, groups), generator=g, dtype=torch.int8)
        t["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    want = _peer_decompress(t, bits, group, sym)
    s = compressed.WeightScheme(("Linear",), bits, group, sym)
    qt = compressed.decode_module(t, s, "m")
    assert qt.qtype == f"int{bits}_g{group or 'ch'}" + ("_sym" if sym else "")
    mine = torch.from_numpy(fq.dequantize(qt))
    assert torch.equal(mine.to(want.dtype), want)


def _write_folder(tmp_path, qc: dict) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": qc})
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"weights": {"actorder": "group"}}, "actorder is 'group'"),
        ({"input_activations": {"num_bits": 8}}, "activation quantization"),
        ({"format": "float-quantized"}, "format is 'float-quantized'"),
        ({"weights": {"strategy": "tensor"}}, "strategy 'tensor'"),
        ({"weights": {"type": "float"}}, "static int weights"),
    ],
)
def test_refuses_what_it_cannot_hold(tmp_path, change, match):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    group = {"targets": ["Linear"], "weights": {**w, **change.pop("weights", {})}, **change}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "quantization_status": "compressed", "config_groups": {"group_0": group}}  # fmt: skip
    _write_folder(tmp_path, qc)
    with pytest.raises(fq.FormatError, match=match):
        fq.load_quantized(tmp_path)
    _write_folder(tmp_path, {**qc, "quantization_status": "frozen"})
    with pytest.raises(fq.FormatError, match="quantization_status is 'frozen'"):
        fq.load_quantized(tmp_path)


# ---- llm-compressor's own checkpoints ---------------------------------------------------------

_LLMC = textwrap.dedent(
    """
    import sys, torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # pinning needs a GPU
    src, out, kind = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": torch.randint(0, 256, (64,), generator=g).tolist(),
             "attention_mask": [1] * 64} for _ in range(8)]
    weights = {"gptq_g64": dict(num_bits=4, symmetric=True, strategy="group", group_size=64),
               "rtn_g32_asym": dict(num_bits=4, symmetric=False, strategy="group", group_size=32),
               "rtn_w8_channel": dict(num_bits=8, symmetric=True, strategy="channel"),
               "awq_g64_asym": dict(num_bits=4, symmetric=False, strategy="group", group_size=64),
               }[kind]
    groups = {"group_0": {"targets": ["Linear"], "weights": {"type": "int", **weights}}}
    if kind.startswith("awq"):  # AWQ scales folded into the norms, its own RTN step after
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
        recipe = AWQModifier(config_groups={"g": scheme}, ignore=["lm_head"])
        oneshot(model=model, dataset=Dataset.from_list(rows), recipe=recipe, max_seq_length=64,
                num_calibration_samples=8, output_dir=out)
    elif kind.startswith("gptq"):
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
        oneshot(model=model, dataset=Dataset.from_list(rows), recipe=recipe, max_seq_length=64,
                num_calibration_samples=8, output_dir=out)
    else:
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
                output_dir=out)
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random Llama (hidden 128, ffn 256) in float16 with a word-level tokenizer (as
    tests/test_gptq_checkpoints: llm-compressor wants a processor beside a dataset)."""
    require("transformers")
    from tiny_llama import write_small_word_llama

    return write_small_word_llama(tmp_path_factory.mktemp("tiny-ct"), VOCAB)


@pytest.mark.model_peers
@pytest.mark.parametrize(
    ("kind", "qtype"),
    [
        ("gptq_g64", "int4_g64_sym"),
        ("rtn_g32_asym", "int4_g32"),
        ("rtn_w8_channel", "int8_gch_sym"),
        ("awq_g64_asym", "int4_g64"),
    ],
)
def test_llmcompressor_checkpoint_loads_exactly(tiny, tmp_path, kind, qtype):
    require("llmcompressor")
    require("compressed_tensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ferroquant.nn import QuantLinear

    out = tmp_path / kind
    r = subprocess.run([sys.executable, "-c", _LLMC, str(tiny), str(out), kind],
                       capture_output=True, text=True, cwd=tmp_path, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]

    ours = fq.load_quantized(out)
    mods = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 14 and {m.qtype for m in mods.values()} == {qtype}
    sd = load_file(str(out / "model.safetensors"))
    want_all = {}
    for name, mod in mods.items():
        t = {k: sd[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape",
             "weight_zero_point") if f"{name}.{k}" in sd}  # fmt: skip
        want = _peer_decompress(t, w["num_bits"], w.get("group_size") or 0, w["symmetric"])
        assert want.dtype == torch.float16
        assert torch.equal(mod.dequantized_weight().to(want.dtype), want), name
        want_all[name] = want
    # no requantizing: the codes are the checkpoint's
    name = "model.layers.1.mlp.down_proj"
    assert np.array_equal(
        fq.models.packed_int._stream_unpack(
            sd[f"{name}.weight_packed"].numpy(), w["num_bits"], 256, 1
        ),  # fmt: skip
        fq.models.packed_int._parts(mods[name].qtensor())[1],
    )
    # logits: against the float model holding the peer's decompressed weights and, where
    # transformers' compressed-tensors loader reads the folder (symmetric: it re-initialises
    # packed zero points it sees with the unpacked shape, with 5.23 + compressed-tensors 0.19),
    # against transformers itself
    peers = [AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float16)]
    params = dict(peers[0].named_parameters())
    for key, t in sd.items():  # the float tensors as stored (AWQ scaled the norms)
        if key in params:
            params[key].data = t.to(params[key].dtype)
    for name, w_peer in want_all.items():
        peers[0].get_submodule(name).weight.data = w_peer
    if w["symmetric"]:
        peers.append(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids).logits.float()
        for peer in peers:
            assert (a - peer(ids).logits.float()).abs().max().item() < 5e-3
