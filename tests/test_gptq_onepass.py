"""True-sequential GPTQ in one forward pass per layer (`methods/gptq_onepass.py`) against the
multi-pass path it replaces (`gptq_sequential`, one partial forward per group plus one for the
outputs): the same stored bytes, plain and with the asymmetric target, and the errors it owes.

Provenance: the expected bytes come from the other, independently structured path on the same
model and tokens, not from this path's own earlier output."""

from __future__ import annotations

import copy

import pytest
import tiny_llama

import ferroquant as fq
from ferroquant.methods import gptq_onepass

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _tiny(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


_qbytes = tiny_llama.quantized_bytes


def _run(model, ids, cfg, one_pass: bool, monkeypatch, qtype="q4_k_m"):
    calls = []
    real = gptq_onepass.one_pass_layer

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(gptq_onepass, "ENABLED", one_pass)
    monkeypatch.setattr(gptq_onepass, "one_pass_layer", counted)
    out = fq.quantize_model(copy.deepcopy(model), qtype, method="gptq", calibration=ids,
                            config=cfg, progress=False)  # fmt: skip
    return out, calls


@pytest.mark.parametrize(("windows", "asym"), [(1, 0.25), (8, 0.0), (5, 0.25)])
def test_one_pass_gives_the_multi_pass_bytes(monkeypatch, asym, windows):
    model = _tiny()
    ids = torch.randint(0, 320, (windows, 48), generator=torch.Generator().manual_seed(windows))
    cfg = {"n_samples": windows, "seq_len": 48, "true_sequential": True, "asym_alpha": asym}
    one, calls = _run(model, ids, cfg, True, monkeypatch)
    multi, none = _run(model, ids, cfg, False, monkeypatch)
    assert calls == ["model.layers.0", "model.layers.1"] and none == []
    a, b = _qbytes(one), _qbytes(multi)
    assert len(a) == 14 and a == b  # 7 Linears x 2 layers
    assert one.ferroquant_plan == multi.ferroquant_plan
    with torch.no_grad():
        assert torch.equal(one(ids).logits, multi(ids).logits)


def test_a_layer_that_calls_its_linears_otherwise_gets_the_multi_pass_bytes(monkeypatch):
    """Groups that disagree with the pass (here q/k/v said to take separate inputs) raise
    `Mismatch` inside it: the layer's weights come back and it takes the multi-pass path, whose
    bytes it then has; the next layer finds its groups anew and runs in one pass."""
    from ferroquant.methods import gptq_sequential

    model = _tiny()
    ids = torch.randint(0, 320, (3, 48), generator=torch.Generator().manual_seed(3))
    cfg = {"n_samples": 3, "seq_len": 48, "true_sequential": True, "asym_alpha": 0.25}
    real = gptq_onepass.shared_inputs
    found = []

    def split_first(layer, call, batch):
        groups = real(layer, call, batch)
        found.append(groups)
        return [[n] for g in groups for n in g] if len(found) == 1 else groups

    fallbacks = []
    real_fallback = gptq_sequential.multi_pass_layer

    def counted(*a, **k):
        fallbacks.append(a[0])
        return real_fallback(*a, **k)

    monkeypatch.setattr(gptq_onepass, "shared_inputs", split_first)
    monkeypatch.setattr(gptq_sequential, "multi_pass_layer", counted)
    one, calls = _run(model, ids, cfg, True, monkeypatch)
    multi, _ = _run(model, ids, cfg, False, monkeypatch)
    assert fallbacks == ["model.layers.0"] and len(found) == 2
    assert found[0][0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert _qbytes(one) == _qbytes(multi)


def test_one_pass_is_not_the_float_statistics_solve(monkeypatch):
    """True-sequential statistics (the groups before quantized) differ from the capture's float
    layer's: the one pass really recomputes them."""
    model = _tiny(1)
    ids = torch.randint(0, 320, (4, 48), generator=torch.Generator().manual_seed(1))
    base = {"n_samples": 4, "seq_len": 48, "asym_alpha": 0.0}
    one, calls = _run(model, ids, {**base, "true_sequential": True}, True, monkeypatch)
    plain, _ = _run(model, ids, base, True, monkeypatch)
    assert calls == ["model.layers.0"]
    a, b = _qbytes(one), _qbytes(plain)
    assert a["model.layers.0.self_attn.q_proj"] == b["model.layers.0.self_attn.q_proj"]
    assert a["model.layers.0.mlp.down_proj"] != b["model.layers.0.mlp.down_proj"]


def test_more_windows_than_a_shard_or_a_runner_take_the_multi_pass_path():
    from ferroquant.calib.capture import SHARD_WINDOWS

    ids = torch.zeros((SHARD_WINDOWS, 4), dtype=torch.long)
    assert gptq_onepass.applies(ids, None)
    assert not gptq_onepass.applies(torch.zeros((SHARD_WINDOWS + 1, 4), dtype=torch.long), None)
    assert not gptq_onepass.applies(ids, object())


def test_non_finite_activations_name_the_linear():
    model = _tiny(1)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("inf")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    cfg = {"n_samples": 2, "seq_len": 16, "true_sequential": True, "asym_alpha": 0.0}
    with pytest.raises(ValueError, match=r"non-finite activations at the input of .*q_proj"):
        fq.quantize_model(model, "q4_0", method="gptq", calibration=ids, config=cfg,
                          progress=False)  # fmt: skip
