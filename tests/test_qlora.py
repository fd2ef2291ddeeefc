"""QLoRA: QuantLinear's training path (dequantize per call, torch GEMM) equals torch's autograd
through the dequantized weight bit for bit and stays within the derived bound of the float64
products, for every qtype and both compute dtypes; inference stays on the kernel; its weight
stays frozen and no float copy is saved; peft's LoRA on QuantLinear; merge_lora; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.nn import QuantLinear

ALL_QTYPES = [q.name for q in fq.qtypes()]
U32 = 2.0**-24  # float32 unit roundoff


def _quant_linear(
    qtype: str, n: int = 40, k: int = 256, seed: int = 0, bias: bool = True
) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_linear(lin, qtype)


BF16_U = 2.0**-8  # bfloat16 unit roundoff (8 significand bits)


def _gamma(m: int) -> float:
    """gamma_m for float32: the relative bound of m float32 roundings."""
    return m * U32 / (1 - m * U32)


def _bound_constant(length: int, dtype: torch.dtype) -> float:
    """c with |computed - exact| <= c * (|a| @ |b|) for a length-`length` dot product of float32
    inputs computed as torch's CPU GEMM in `dtype` after casting both inputs to it (derived in
    docs/training.md): float32 accumulates in float32 (gamma_(length+1)); bfloat16 rounds each
    input (2u + u^2), accumulates the exact products in float32, and rounds the sum once to
    bfloat16 (u)."""
    g = _gamma(length + 1)
    if dtype == torch.float32:
        return g
    u = BF16_U
    return 2 * u + u * u + (1 + u) ** 2 * (g + u * (1 + g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_training_forward_and_input_grad_equal_torch_autograd_through_dequantized_w(qtype, dtype):
    """With autograd recording on the CPU, QuantLinear runs `dequant_matmul`: bit for bit what
    torch's own autograd gives through F.linear(x.to(dtype), dequantize(W).to(dtype))."""
    ql = _quant_linear(qtype)
    ql.train_dtype = dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, ql.in_features, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 3, ql.out_features, generator=g)
    y = ql(x)
    y.backward(grad_y)
    w = ql.dequantized_weight().to(dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref.to(dtype), w).to(torch.float32) + ql.bias
    y_ref.backward(grad_y)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert x.grad.abs().max() > 0  # the check is not vacuous
    # the weight is frozen: bytes and statistics are buffers, the bias takes no gradient
    assert all(not p.requires_grad for p in ql.parameters())
    assert not ql.qweight.requires_grad and ql.qweight.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("qtype", ALL_QTYPES)
def test_training_path_is_within_the_derived_bound_of_the_exact_products(qtype, dtype):
    """y and grad_x of the training path against x @ W.T and grad_y @ W in float64 (W the
    dequantized weight): within c * |x| @ |W|.T, c from _bound_constant (about 3 * 2^-8 for
    bfloat16)."""
    ql = _quant_linear(qtype, bias=False)
    ql.train_dtype = dtype
    n, k = ql.out_features, ql.in_features
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, k, generator=g, requires_grad=True)
    grad_y = torch.randn(4, n, generator=g)
    y = ql(x)
    y.backward(grad_y)
    w = fq.dequantize(ql.qtensor()).astype(np.float64)
    x64, g64 = x.detach().double().numpy(), grad_y.double().numpy()
    for got, exact, bound, what in [
        (y.detach(), x64 @ w.T, _bound_constant(k, dtype) * (np.abs(x64) @ np.abs(w).T), "y"),
        (x.grad, g64 @ w, _bound_constant(n, dtype) * (np.abs(g64) @ np.abs(w)), "grad_x"),
    ]:
        err = np.abs(got.double().numpy() - exact)
        assert (err <= bound).all(), f"{qtype} {what}: max error {err.max():.3g} over bound"
        assert np.abs(exact).max() > 0


def test_the_kernel_op_backward_stays_float32():
    """`ferroquant::qmatmul` called directly with grad (the inference kernel's op) keeps its
    float32 backward: grad_x within gamma_(n+1) |grad_y| |W| of the float64 product."""
    ql = _quant_linear("q4_k", k=256)
    n, k = ql.out_features, ql.in_features
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, k, generator=g, requires_grad=True)
    grad_y = torch.randn(3, n, generator=g)
    fmt = (ql.qtype, n, k, ql.block_size, ql.scale_mode or "")
    torch.ops.ferroquant.qmatmul(x, ql.qweight, ql.qstats, *fmt).backward(grad_y)
    w = fq.dequantize(ql.qtensor()).astype(np.float64)
    g64 = grad_y.double().numpy()
    err = np.abs(x.grad.double().numpy() - g64 @ w)
    assert (err <= _gamma(n + 1) * (np.abs(g64) @ np.abs(w))).all()


@settings(max_examples=60, deadline=None)
@given(
    qtype=st.sampled_from(ALL_QTYPES),
    rows=st.integers(1, 70),
    scale=st.sampled_from([1e-30, 1e-6, 0.05, 1.0, 5e3]),
    zero_rows=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantize_into_equals_torchs_cast_of_the_reference(
    qtype, rows, scale, zero_rows, threads, seed
):
    """The training path's dequantization (`_native.dequantize_into`, written into a reused
    buffer; nf4/fp4 straight to bfloat16, row by row) equals the Rust reference's float32 values,
    and in bfloat16 torch's own cast of them (round to nearest even), for every format, on one
    thread (in the calling thread) and on two; tiny, huge and all-zero rows included."""
    from ferroquant import _native
    from ferroquant.tensor import dequantize

    k = 256
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * scale
    if zero_rows:
        w[::3] = 0
    qt = fq.quantize(w, qtype)
    ref = torch.from_numpy(dequantize(qt)).reshape(rows, k)
    stats = np.asarray(qt.stats, dtype=np.float32).reshape(-1)
    before = fq.num_threads()
    fq.set_num_threads(threads)
    try:
        for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
            out = torch.full((rows * k,), float("nan"), dtype=dtype)
            view = out.view(torch.uint16 if dtype == torch.bfloat16 else dtype).numpy()
            _native.dequantize_into(np.asarray(qt.data).reshape(-1), qtype, rows, k,
                                    qt.block_size, stats, qt.scale_mode, view)  # fmt: skip
            want = ref.to(dtype)
            assert torch.equal(out.view(rows, k).view(bits), want.view(bits)), dtype
    finally:
        fq.set_num_threads(before)


def test_dequantize_into_refuses_a_wrong_output():
    from ferroquant import _native

    ql = _quant_linear("nf4", bias=False)
    n, k = ql.out_features, ql.in_features
    args = (ql.qweight.numpy(), "nf4", n, k, ql.block_size, ql.qstats.numpy(), None)
    with pytest.raises(fq.QuantizeError, match="needs"):
        _native.dequantize_into(*args, np.zeros(n * k - 1, np.uint16))
    with pytest.raises(fq.QuantizeError, match="float32 or uint16"):
        _native.dequantize_into(*args, np.zeros(n * k, np.float64))
    with pytest.raises(fq.QuantizeError, match="absmax"):
        _native.dequantize_into(*args[:5], ql.qstats.numpy()[:-1], None, np.zeros(n * k, np.uint16))


def test_layers_sharing_the_scratch_buffer_give_torchs_gradients():
    """Every training call writes its W into one buffer per thread: a chain of layers of
    different shapes (each backward rewriting it) still matches torch's autograd through the
    dequantized weights exactly."""
    a, b = _quant_linear("nf4", n=64, k=256, seed=1), _quant_linear("q4_k", n=256, k=64 * 4, seed=2)
    c = _quant_linear("nf4", n=40, k=256, seed=3)
    x = torch.randn(3, 256, requires_grad=True)
    y = c(b(torch.nn.functional.pad(a(x), (0, 192))))
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)

    def ref(layer, t):
        w = layer.dequantized_weight().to(torch.bfloat16)
        return torch.nn.functional.linear(t.to(torch.bfloat16), w).to(torch.float32) + layer.bias

    yr = ref(c, ref(b, torch.nn.functional.pad(ref(a, xr), (0, 192))))
    yr.square().sum().backward()
    assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)


def test_inference_runs_the_kernel_and_training_saves_no_float_weight():
    """Without autograd recording, forward is the Rust kernel bit for bit (the inference path
    is unchanged); with it, what autograd saves for backward is the quantized bytes and
    statistics only: no float copy of W outlives the forward."""
    from ferroquant import _native

    ql = _quant_linear("nf4", bias=False)
    n, k = ql.out_features, ql.in_features
    x = torch.randn(5, k, requires_grad=True)
    kernel = _native.qmatmul(x.detach().numpy(), ql.qweight.numpy(), "nf4", n, k,
                             ql.block_size, ql.qstats.numpy(), None)  # fmt: skip
    with torch.no_grad():
        assert torch.equal(ql(x), torch.from_numpy(np.asarray(kernel)))
    assert torch.equal(ql(x.detach()), torch.from_numpy(np.asarray(kernel)))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ql(x)
    assert not torch.equal(y, torch.from_numpy(np.asarray(kernel)))  # the training path ran
    assert saved and all(t.dtype == torch.uint8 or t.numel() == ql.qstats.numel() for t in saved)
    assert set(ql.state_dict()) == {"qweight", "qstats", "_extra_state"}


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


def test_a_model_without_linear_layers_is_one_clear_error():
    from ferroquant.train.lora import apply_lora

    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.ReLU())
    with pytest.raises(fq.QuantizeError, match="Sequential has no nn.Linear or QuantLinear"):
        apply_lora(model, r=4)
    assert not hasattr(model, "peft_config") and len(list(model.modules())) == 3


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


def test_the_training_path_compiles():
    """torch.compile traces `dequant_matmul` (its fake implementation and autograd formula): the
    compiled forward and input gradient equal eager's."""
    ql = _quant_linear("q4_0")
    x = torch.randn(3, ql.in_features, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    y = ql(x)
    y.sum().backward()
    yc = torch.compile(ql, backend="aot_eager", fullgraph=True)(xc)
    yc.sum().backward()
    assert torch.equal(y, yc) and torch.equal(x.grad, xc.grad)
