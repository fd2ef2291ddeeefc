"""QLoRA: QuantLinear's gradient with respect to its input equals grad_y @ dequantize(W) (float64
reference, float32 rounding bound) for every qtype, and its weight stays frozen; peft's LoRA on
QuantLinear; merge_lora; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ferroquant as fq
from ferroquant.nn import QuantLinear

ALL_QTYPES = [q.name for q in fq.qtypes()]
U32 = 2.0**-24  # float32 unit roundoff


def _quant_linear(qtype: str, n: int = 40, k: int = 256, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_linear(lin, qtype)


@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_grad_input_is_grad_y_times_dequantized_weight(qtype):
    ql = _quant_linear(qtype)
    n, k = ql.out_features, ql.in_features
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, k, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 3, n, generator=g)
    ql(x).backward(grad_y)
    w = fq.dequantize(ql.qtensor()).astype(np.float64)
    gy = grad_y.reshape(-1, n).double().numpy()
    exact = gy @ w
    # float32 dot products of length n, rounded once more on output: |err| <= gamma_{n+1} |g||W|
    gamma = (n + 1) * U32 / (1 - (n + 1) * U32)
    bound = gamma * (np.abs(gy) @ np.abs(w))
    got = x.grad.reshape(-1, k).double().numpy()
    err = np.abs(got - exact)
    assert (err <= bound).all(), f"{qtype}: max error {err.max():.3g} over bound"
    assert np.abs(exact).max() > 0  # the check is not vacuous
    # the weight is frozen: bytes and statistics are buffers, the bias takes no gradient
    assert all(not p.requires_grad for p in ql.parameters())
    assert not ql.qweight.requires_grad and ql.qweight.grad is None


def _tiny_llama(qtype: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return fq.quantize_model(LlamaForCausalLM(cfg), qtype, progress=False)


def _randomize_adapters(pm, seed: int = 0) -> None:
    """peft starts B at zero (the adapter adds nothing): give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_peft_wraps_quant_linear_and_trains_only_the_adapters():
    from ferroquant.train.lora import QuantLoraLinear, apply_lora

    pm = apply_lora(_tiny_llama("nf4"), r=4, targets=["q_proj", "v_proj"])
    attn = pm.get_base_model().model.layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLoraLinear) and isinstance(attn.v_proj, QuantLoraLinear)
    assert isinstance(attn.k_proj, QuantLinear)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    # B starts at zero, so A's gradient is zero; B's is not in every layer, including layer 0,
    # which the loss reaches only through the quantized layers above it
    for layer in pm.get_base_model().model.layers:
        g = layer.self_attn.q_proj.lora_B["default"].weight.grad
        assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize(("base", "merged"), [("nf4", None), ("q4_k", None), ("nf4", "q8_0")])
def test_merge_lora_is_the_requantized_sum(base, merged):
    from ferroquant.train.lora import apply_lora, merge_lora

    pm = apply_lora(_tiny_llama(base), r=4)
    _randomize_adapters(pm)
    layer = pm.get_base_model().model.layers[1].self_attn.v_proj
    w = layer.get_base_layer().dequantized_weight()
    base_q = layer.get_base_layer().qtype  # (a 64-wide row takes the recipe's fallback for q4_k)
    sc = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    want = fq.quantize(w + (b @ a) * sc, merged or base_q)
    model = merge_lora(pm, merged)
    assert not hasattr(model, "peft_config")
    got = model.model.layers[1].self_attn.v_proj
    assert isinstance(got, QuantLinear) and got.qtype == (merged or base_q)
    assert np.array_equal(got.qweight.numpy(), np.asarray(want.data).reshape(-1))
    assert np.array_equal(got.qstats.numpy(), np.asarray(want.stats, np.float32).reshape(-1))
    assert not any("lora" in n for n, _ in model.named_modules())


def test_missing_target_is_named():
    from ferroquant.train.lora import apply_lora

    with pytest.raises(ValueError, match=r"LoRA target 'qq_proj' matches no module.*q_proj"):
        apply_lora(_tiny_llama("q8_0"), r=4, targets=["q_proj", "qq_proj"])


def test_merged_gguf_runs_in_llama_cpp_with_our_logits(tmp_path):
    """The merged model written as GGUF: llama.cpp's logits agree with ours within the bound of
    test_gguf_model.py's quantized check (2.5x our own activation-rounding error against the
    float twin: both engines round activations to q8 blocks, in different summation orders)."""
    import copy

    from ferroquant.models.gguf_model import dequantize_model
    from ferroquant.train.finetune import load_float_model
    from ferroquant.train.lora import apply_lora, merge_lora

    from peers import require, smollm2_gguf

    llama_cpp = require("llama_cpp")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True)  # fmt: skip
    src = tmp_path / "tiny.gguf"
    fq.save_gguf_model(LlamaForCausalLM(cfg), src, tokenizer=smollm2_gguf(), float_type="f32")
    model, _ = load_float_model(src)
    fq.quantize_model(model, "q8_0", progress=False)
    pm = apply_lora(model, r=4)
    _randomize_adapters(pm)
    merged = merge_lora(pm)
    out = tmp_path / "merged.gguf"
    types = fq.save_gguf_model(merged, out, tokenizer=str(src))
    assert "q8_0" in set(types.values())
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(str(out), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=f32, type_v=f32)  # fmt: skip
    ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    del llm
    twin = dequantize_model(copy.deepcopy(merged))
    with torch.no_grad():
        ours = merged(torch.tensor([ids])).logits[0].numpy()
        flt = twin(torch.tensor([ids])).logits[0].numpy()
    e, d = np.abs(ours - flt), np.abs(ours - got)
    assert 0 < e.max() < 3
    assert d.max() <= 2.5 * e.max(), (d.max(), e.max())


def test_merge_lora_with_gptq_quantizes_the_merged_float_weights():
    from ferroquant.train.lora import apply_lora, merge_lora

    pm = apply_lora(_tiny_llama("nf4"), r=4)
    _randomize_adapters(pm)
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    sc = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    want = layer.get_base_layer().dequantized_weight() + (b @ a) * sc
    calib = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(1))
    model = merge_lora(pm, "q8_0", method="gptq", calibration=calib,
                       config={"n_samples": 2, "seq_len": 16})  # fmt: skip
    assert "gptq" in str(model.ferroquant_method)
    got = model.model.layers[0].self_attn.q_proj
    assert isinstance(got, QuantLinear) and got.qtype == "q8_0"
    # q8_0's grid step is amax / 127 per block of 32: GPTQ's error feedback stays within a few
    step = want.abs().reshape(-1, 32).amax(1, keepdim=True) / 127
    err = (got.dequantized_weight() - want).abs().reshape(-1, 32)
    assert (err <= 4 * step + 1e-7).all()
    with pytest.raises(ValueError, match="needs the qtype"):
        merge_lora(apply_lora(_tiny_llama("nf4"), r=4), method="gptq")
