"""`ferroquant finetune`: the argument checks (one clear error, nothing written, before any model
is loaded), the --lora option's parser, and end-to-end runs on a tiny llama GGUF with SmolLM2's
tokenizer (QAT to GGUF that llama.cpp runs, plain fine-tuning then quantization to safetensors);
the full-size run is benches/bench_train.py's."""

from __future__ import annotations

import numpy as np
import pytest

from ferroquant.cli import main
from ferroquant.train.finetune import LoraSpec, parse_lora


def test_parse_lora():
    assert parse_lora("r=16") == LoraSpec(16)
    assert parse_lora("r=8,alpha=16,targets=q_proj,v_proj,o_proj") == LoraSpec(
        8, 16.0, 0.0, ["q_proj", "v_proj", "o_proj"]
    )
    assert parse_lora("targets=k_proj, r=4, dropout=0.1") == LoraSpec(4, None, 0.1, ["k_proj"])
    for bad, msg in [
        ("alpha=3", "needs r=RANK"),
        ("r=0", "at least 1"),
        ("r=x", "r is an integer"),
        ("r=4,rank=3", "unknown field 'rank'"),
        ("q_proj,r=4", "expected key=value"),
        ("r=4,targets=", "at least one module"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_lora(bad)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--qat", "q9_9"], "unknown qtype or mix 'q9_9'"),
        (["--qat", "q4_0", "--qtype", "q8_0"], "disagree"),
        (["--lora", "r=16"], "a .gguf output cannot hold nf4"),
        (["--lora", "r=16", "--qat", "q4_0"], "use it without --qat"),
        (["--merge-qtype", "q4_0"], "--merge-qtype applies to --lora only"),
        (["--lora", "r=16,bogus=1"], "unknown field 'bogus'"),
        (["--qtype", "ternary"], "use --qat ternary"),
        (["--steps", "0"], "--steps >= 1"),
        (["--text", "/nonexistent/train.txt"], "train.txt"),
    ],
)
def test_bad_arguments_fail_before_any_work_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out.gguf"
    assert main(["finetune", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferroquant finetune: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bad_output_and_model_paths(tmp_path, capsys):
    assert main(["finetune", "-o", str(tmp_path / "out.bin")]) == 2
    assert "-o must end in .gguf or .safetensors" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "o.gguf")]) == 2
    assert "no such model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer, 64-wide llama with SmolLM2's tokenizer, as an f32 GGUF (seconds to train)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import ferroquant as fq

    from peers import smollm2_gguf

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    fq.save_gguf_model(LlamaForCausalLM(cfg), path, tokenizer=smollm2_gguf(), float_type="f32")
    return path


def _tiny_run(tmp_path, *args: str) -> list[str]:
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--text", str(text), "--steps", "2", "--batch", "2", "--seq-len", "32",
              "--eval-tokens", "64"]  # fmt: skip
    return ["finetune", *common, *args]


def test_qat_run_writes_a_gguf_llama_cpp_reads(tiny_gguf, tmp_path, capsys):
    import ferroquant as fq

    from peers import require

    out = tmp_path / "qat.gguf"
    assert main(_tiny_run(tmp_path, str(tiny_gguf), "--qat", "q8_0", "-o", str(out))) == 0
    log = capsys.readouterr().out
    assert "QAT q8_0" in log and "step 2/2  loss " in log and "held-out perplexity" in log
    with fq.gguf.open(out) as f:
        kinds = {t.qtype for t in f.tensors.values()}
    assert "q8_0" in kinds
    llama_cpp = require("llama_cpp")
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()
    del llm


def test_plain_run_quantizes_after_training_to_safetensors(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "plain.safetensors"
    assert main(_tiny_run(tmp_path, str(tiny_gguf), "--qtype", "nf4", "-o", str(out))) == 0
    log = capsys.readouterr().out
    assert "plain fine-tuning, then nf4" in log and out.is_file()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert any(k.endswith("q_proj.qweight") for k in f.keys())


def test_lora_run_merges_and_writes_a_gguf_llama_cpp_reads(tiny_gguf, tmp_path, capsys):
    from peers import require

    out = tmp_path / "qlora.gguf"
    args = _tiny_run(tmp_path, str(tiny_gguf), "--lora", "r=4", "--merge-qtype", "q8_0")
    assert main([*args, "-o", str(out)]) == 0
    log = capsys.readouterr().out
    assert "QLoRA r=4 on q_proj,v_proj over a nf4 base" in log and "step 2/2  loss " in log
    assert "re-quantized to q8_0" in log and "held-out perplexity" in log
    llama_cpp = require("llama_cpp")
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.asarray(llm.scores[:4])).all()
    del llm


def test_lora_target_that_does_not_exist_is_named_and_nothing_written(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "qlora.safetensors"
    args = _tiny_run(tmp_path, str(tiny_gguf), "--lora", "r=4,targets=q_proj,attn_qkv")
    assert main([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # (after transformers' GGUF loading progress bar)
    assert last.startswith("ferroquant finetune: LoRA target 'attn_qkv' matches no module")
    assert not out.exists()


@pytest.mark.parametrize("mode", [["--qat", "q4_k"], ["--lora", "r=4", "--qtype", "q4_k"]])
def test_qtype_that_cannot_hold_the_rows_is_named_and_nothing_written(
    tiny_gguf, tmp_path, capsys, mode
):
    """The tiny model's 64-wide rows hold no q4_k block (256): one error naming the layer, for
    QAT and for a QLoRA base alike, before training; nothing written."""
    out = tmp_path / "out.safetensors"
    assert main([*_tiny_run(tmp_path, str(tiny_gguf), *mode), "-o", str(out)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("ferroquant finetune: model.layers.0.self_attn.q_proj: row length 64")
    assert "q4_k's block size 256" in last
    assert not out.exists()
