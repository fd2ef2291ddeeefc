"""Quantized models round-trip through safetensors; bitsandbytes 4-bit checkpoints load into
QuantLinear without re-quantizing."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ferroquant as fq  # noqa: E402
from ferroquant.models import load_bnb_4bit, load_quantized, save_quantized  # noqa: E402
from ferroquant.nn import QuantLinear  # noqa: E402

from peers import require  # noqa: E402


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32, bias=False))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q5_1"])
def test_safetensors_round_trip_gives_identical_outputs(tmp_path, qtype):
    m = fq.quantize_model(_model(), qtype, skip=(), progress=False)
    path = tmp_path / "m.safetensors"
    save_quantized(m, path)
    fresh = load_quantized(_model(seed=1), path)
    assert isinstance(fresh[0], QuantLinear) and fresh[0].qtype == qtype
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), m(x))


def test_save_is_atomic_and_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous contents")
    m = fq.quantize_model(_model(), "q8_0", skip=(), progress=False)

    class Boom(Exception):
        pass

    def failing_save(*a, **k):
        raise Boom()

    import safetensors.torch as st

    orig = st.save_file
    st.save_file = failing_save
    try:
        with pytest.raises(Boom):
            save_quantized(m, path)
    finally:
        st.save_file = orig
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind
    other = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(fq.QuantizeError, match="not a ferroquant checkpoint"):
        load_quantized(_model(), other)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_nf4_checkpoint_loads_without_requantizing(double_quant):
    bnb = require("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    q = bnb.nn.Linear4bit(
        256,
        64,
        bias=True,
        compress_statistics=double_quant,
        quant_type="nf4",
        compute_dtype=torch.float32,
    )
    q.weight = bnb.nn.Params4bit(
        lin.weight.data.clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type="nf4",
        blocksize=64,
    )
    q.bias = nn.Parameter(lin.bias.data.clone())
    q = q.to("cpu")
    sd = {f"0.{k}": v for k, v in q.state_dict().items()}
    model = load_bnb_4bit(nn.Sequential(nn.Linear(256, 64)), sd)
    ql = model[0]
    assert isinstance(ql, QuantLinear) and ql.qtype == "nf4"
    assert np.array_equal(ql.qweight.numpy(), sd["0.weight"].numpy().reshape(-1))  # bytes as-is
    w_bnb = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    assert torch.equal(ql.dequantized_weight(), w_bnb)
    x = torch.randn(3, 256)
    ref = torch.nn.functional.linear(x.double(), w_bnb.double(), lin.bias.double())
    assert (model(x).double() - ref).abs().max() < 1e-3
