"""ferroquant as a transformers quantization backend (models/hf_quantizer.py), on the tiny Llama
of tests/tiny_llama.py and, behind the model_peers marker, on SmolLM2-135M:

- `from_pretrained(..., quantization_config=FerroquantConfig(...))` quantizes on load: the
  QuantLinears hold exactly the bytes `quantize_model` gives the float checkpoint (rtn: every
  tensor equal to `fq.quantize` of its float weight; gptq, awq: equal to `quantize_model(method=
  ...)` on the same calibration tokens, AWQ's folded norms included);
- `save_pretrained` writes our packed tensors and a quantization_config naming ferroquant;
  `from_pretrained` of that folder rebuilds the same QuantLinears (same bytes) and its logits are
  bit-identical to the model that was saved;
- bad input (unknown qtype / method / option, a group that does not divide a row, a saved config
  naming an unknown qtype) is one QuantizeError before any weight loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_llama import make_tiny_llama

import ferroquant as fq
import ferroquant.models

from peers import require

torch = pytest.importorskip("torch")
require("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from ferroquant.nn import QuantLinear  # noqa: E402

IDS = torch.arange(5, 45).reshape(2, 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-hfq"))


def _quant(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _round_trip(model, out):
    """save_pretrained -> from_pretrained: the same modules, bytes and logits bit for bit."""
    want = _logits(model)
    model.save_pretrained(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ferroquant"
    assert set(qc["modules"]) == set(_quant(model))
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in _quant(model):  # our packed tensors, no float weight
        assert f"{name}.qweight" in keys and f"{name}.weight" not in keys
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype)
    mods, saved = _quant(back), _quant(model)
    assert set(mods) == set(saved)
    for name, m in mods.items():
        assert type(m) is QuantLinear and m.qtype == saved[name].qtype
        assert torch.equal(m.qweight, saved[name].qweight), name
        assert m.qstats.dtype == torch.float32 and torch.equal(m.qstats, saved[name].qstats)
    assert torch.equal(_logits(back), want)
    # in another dtype the statistics still load as float32, unrounded; the rest follows dtype=
    other = torch.float32 if model.dtype != torch.float32 else torch.bfloat16
    cast = AutoModelForCausalLM.from_pretrained(str(out), dtype=other)
    assert cast.model.norm.weight.dtype == other
    for name, m in _quant(cast).items():
        assert m.qstats.dtype == torch.float32 and torch.equal(m.qstats, saved[name].qstats)
    return back


@pytest.mark.parametrize(("qtype", "dtype"), [("q4_k_m", torch.float32), ("nf4", torch.bfloat16)])
def test_rtn_quantizes_on_load_and_round_trips(tiny, tmp_path, qtype, dtype):
    from safetensors.torch import load_file

    cfg = fq.FerroquantConfig(qtype=qtype)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), quantization_config=cfg, dtype=dtype)
    mods = _quant(model)
    assert len(mods) == 14  # 7 Linears a layer; the (tied) head stays float
    src = load_file(str(tiny / "model.safetensors"))
    for name, m in mods.items():  # what quantize_model gives the loaded float weight
        w = src[f"{name}.weight"].to(dtype)
        assert np.array_equal(np.asarray(m.qweight), fq.quantize(w, m.qtype).data), name
    if qtype == "q4_k_m":  # the mix's per-tensor choices (rows of 288: the legacy fallback)
        assert mods["model.layers.0.mlp.down_proj"].qtype == "q5_0"
        assert mods["model.layers.0.mlp.up_proj"].qtype == "q4_k"
    _round_trip(model, tmp_path / "saved")


@pytest.mark.model_peers
@pytest.mark.parametrize(("qtype", "method"), [("q4_0", "gptq"), ("int4_g32", "awq")])
def test_calibrated_on_load_equals_quantize_model_and_round_trips(tiny, tmp_path, qtype, method):
    from transformers import AutoTokenizer

    opts = {"qtype": qtype, "method": method, "n_samples": 2, "seq_len": 32}
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny), quantization_config=fq.FerroquantConfig(**opts)
    )
    ref = AutoModelForCausalLM.from_pretrained(str(tiny))
    fq.quantize_model(
        ref, qtype, method=method, tokenizer=AutoTokenizer.from_pretrained(str(tiny)),
        config={"n_samples": 2, "seq_len": 32}, progress=False,
    )  # fmt: skip
    ours, want = _quant(model), _quant(ref)
    assert set(ours) == set(want)
    for name, m in ours.items():
        assert torch.equal(m.qweight, want[name].qweight), name
        assert torch.equal(m.qstats, want[name].qstats), name
    # the method is not RTN: at least this tensor differs from plain rounding
    rtn = fq.quantize(_float_weight(tiny, "model.layers.1.mlp.gate_proj"), qtype)
    assert not np.array_equal(np.asarray(ours["model.layers.1.mlp.gate_proj"].qweight), rtn.data)
    back = _round_trip(model, tmp_path / "saved")
    assert back.config.quantization_config.method == method
    if method == "awq":  # the scales folded into the norms are saved with the model
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(back.state_dict()[norm], ref.state_dict()[norm])
        assert not torch.equal(back.state_dict()[norm], _float_weight(tiny, norm[:-7]))


def _float_weight(folder, name):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))[f"{name}.weight"]


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"qtype": "q9_x"}, "unknown qtype or mix 'q9_x'"),
        ({"method": "gptqq"}, "unknown method 'gptqq'"),
        ({"method": "gptq", "method_options": {"dampx": 1}}, "unknown gptq option"),
        ({"method": "rtn", "n_samples": 4}, "n_samples / seq_len are for"),
        ({"method": "gptq", "calibration": "/no/such/file.txt"}, "calibration file"),
        ({"bits": 4}, "unknown field"),
    ],
)
def test_config_refuses_bad_fields(fields, match):
    with pytest.raises(fq.QuantizeError, match=match):
        fq.FerroquantConfig(**fields)


def test_group_that_does_not_divide_a_row_is_refused_before_loading(tiny):
    # the tiny model's down_proj rows hold 288 columns: groups of 128 do not divide them
    with pytest.raises(fq.QuantizeError, match=r"group size 128 does not divide the rows of "
                       r"model\.layers\.0\.mlp\.down_proj \(288 columns\)"):  # fmt: skip
        AutoModelForCausalLM.from_pretrained(
            str(tiny), quantization_config=fq.FerroquantConfig(qtype="int4_g128")
        )
    # groups of 32 divide every row
    m = AutoModelForCausalLM.from_pretrained(
        str(tiny), quantization_config=fq.FerroquantConfig(qtype="int4_g32")
    )
    assert {q.qtype for q in _quant(m).values()} == {"int4_g32"}


def test_saved_config_naming_an_unknown_qtype_is_refused(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny), quantization_config=fq.FerroquantConfig(qtype="q8_0")
    )
    out = tmp_path / "saved"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["qtype"] = "q7_z"
    (out / "config.json").write_text(json.dumps(cfg))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(fq.QuantizeError, match="unknown qtype 'q7_z'"):
        AutoModelForCausalLM.from_pretrained(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"].update(
        qtype="q8_0", qweight=100
    )
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fq.QuantizeError, match=r"modules\['model.layers.0.mlp.up_proj'\]: 100 "):
        AutoModelForCausalLM.from_pretrained(str(out))
    cfg["quantization_config"]["modules"] = {}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fq.QuantizeError, match="names no quantized module"):
        AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.model_peers
def test_smollm2_quantizes_on_load_and_round_trips(tmp_path):
    """The real model (SmolLM2-135M, its shipped GGUF dequantized to a float folder)."""
    from peers import smollm2_gguf

    gguf = smollm2_gguf()
    src = tmp_path / "float"
    fq.models.gguf_to_hf(gguf, src)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=fq.FerroquantConfig(qtype="q4_k_m")
    )
    assert len(_quant(model)) == 30 * 7
    _round_trip(model, tmp_path / "saved")
