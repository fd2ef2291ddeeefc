"""The GGUF tokenizer of `ferroquant.runtime.tokenizer` against transformers and llama.cpp.

Peers: transformers' tokenizer built from the same GGUF (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`) and llama-cpp-python's (`Llama(path, vocab_only=True).tokenize`), which defines
what a GGUF's tokenizer is. Model: the shipped SmolLM2-135M-Instruct (byte-level BPE,
`tokenizer.ggml.pre = "smollm"`); a SentencePiece vocabulary is written here (a few tokens,
scores, the 256 byte tokens) and checked against llama.cpp.

One known difference: llama.cpp (and SmolLM2's own tokenizer.json) split digits off before the
GPT-2 regex ("smollm": `\\p{N}` first), transformers' GGUF conversion applies only the GPT-2 regex.
They differ where two or more spaces precede a digit (" 12  345": llama.cpp and we give "ĠĠ" for
the two spaces, transformers "Ġ", "Ġ"); there we follow llama.cpp, and the test says so.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferroquant as fq
import ferroquant.gguf as fg
from ferroquant.defaults import default_text_path
from ferroquant.runtime import load_tokenizer
from ferroquant.runtime.tokenizer import GGUFTokenizer, byte_alphabet

import peers  # noqa: E402
from peers import REQUIRE_PEERS, require

EDGE_CASES = [
    "",
    " ",
    "   ",
    "Hello world",
    " Hello  world   ",
    "héllo wörld, naïve café; Ελληνικά, русский, 日本語, 🦙🚀",
    "1234567890 3.14159 2026-12-06 x1y22z333",
    "a\nb\n\nc\r\nd\te\t\tf",
    "\n\n\n",
    " \n ",
    "don't I'll WE'RE you've",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square\n",
]
# Two or more spaces before a digit: transformers' conversion drops "smollm"'s digit split.
TRANSFORMERS_DIFFERS = re.compile(r"\s{2,}\d")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return peers.smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path) -> GGUFTokenizer:
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


_LLAMAS: dict[str, object] = {}


def llama_vocab(path: Path):
    if str(path) not in _LLAMAS:
        _LLAMAS[str(path)] = require("llama_cpp").Llama(str(path), vocab_only=True, verbose=False)
    return _LLAMAS[str(path)]


@pytest.fixture(scope="module", autouse=True)
def _close_llamas():
    yield
    for llm in _LLAMAS.values():
        llm.close()
    _LLAMAS.clear()


def llama_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    return [
        int(t) for t in llama_vocab(path).tokenize(text.encode(), add_bos=add_bos, special=True)
    ]


def held_out_lines() -> list[str]:
    path = default_text_path()
    if not path.is_file():
        if REQUIRE_PEERS:
            raise AssertionError(f"the held-out text is missing: {path}")
        pytest.skip("gensim's lee.cor is not installed")
    return [s for s in path.read_text(encoding="latin-1").splitlines() if s]


def test_reads_the_files_tokenizer(ours):
    assert ours.model_type == "gpt2" and ours.pre == "smollm" and ours.vocab_size == 49152
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.add_bos_token is False and ours.stop_ids == [ours.eos_token_id]


def test_held_out_text_matches_transformers_and_llama_cpp(ours, hf, gguf_path):
    lines = held_out_lines()
    assert len(lines) > 20
    for s in lines:
        ids = ours.encode(s)
        assert ids == hf(s)["input_ids"], s[:60]
        assert ids == llama_tokenize(gguf_path, s, add_bos=False), s[:60]
        assert ours.decode(ids) == s
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_transformers_and_llama_cpp(ours, hf, gguf_path, text):
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids == llama_tokenize(gguf_path, text, add_bos=False)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_spaces_before_digits_follow_llama_cpp(ours, hf, gguf_path):
    text = " 12  345 and\t\t6"
    ids = ours.encode(text)
    assert ids == llama_tokenize(gguf_path, text, add_bos=False)
    assert ours.tokenizer.id_to_token(ids[3]) == "ĠĠ"
    assert ids != hf(text)["input_ids"]  # transformers: "Ġ", "Ġ" (see the module docstring)
    assert ours.decode(ids) == text


# Characters from the Basic Multilingual Plane: past it, llama.cpp's Unicode tables and the regex
# library's disagree on recently assigned code points (measured: 5 of 5000 random strings split
# "'s" after a U+13xxx hieroglyph differently), which says nothing about this tokenizer.
_TEXT = st.text(
    st.sampled_from(list("ab Zé日🦙0123456789.,'\n\t-_"))
    | st.characters(codec="utf-8", max_codepoint=0xFFFF),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_random_text_matches_llama_cpp_and_round_trips(ours, hf, gguf_path, text):
    ids = ours.encode(text)
    assert ids == llama_tokenize(gguf_path, text, add_bos=False)
    if not TRANSFORMERS_DIFFERS.search(text):
        assert ids == hf(text)["input_ids"]
    # Control tokens written in the text decode to nothing when skipped, and the vocabulary has
    # no token for 21 bytes (0x04, 0x06, ..., 0xC0, 0xC1, 0xF1..0xFF): all three engines drop them.
    if "<|" not in text and not set(text.encode()) & _missing_bytes(ours):
        assert ours.decode(ids) == text


def _missing_bytes(tok: GGUFTokenizer) -> set[int]:
    vocab = tok.tokenizer.get_vocab()
    return {b for b, c in byte_alphabet().items() if c not in vocab}


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?  Ünïcode 12  3"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours, hf, conversation, add_generation_prompt):
    msgs = CONVERSATIONS[conversation]
    text = ours.render_chat(msgs, add_generation_prompt)
    assert text == hf.apply_chat_template(
        msgs, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    want = hf.apply_chat_template(
        msgs, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    want_ids = list(want)
    got = ours.apply_chat_template(msgs, add_generation_prompt)
    if TRANSFORMERS_DIFFERS.search(text):
        assert got == ours.encode(text, add_special_tokens=False)
    else:
        assert got == want_ids


# -- SentencePiece ("llama") against llama.cpp on a small vocabulary written here ----------------

SPM_WORDS = (
    "▁ a b c h e l o ▁a ab ▁ab abc ▁abc ▁▁ he ll hell hello ▁hello lo ca ▁c bc cab ▁cab".split()
)


def spm_metadata() -> dict:
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces + SPM_WORDS,
        "tokenizer.ggml.scores": np.array(
            [0.0] * len(pieces) + [-float(i) for i in range(len(SPM_WORDS))], np.float32
        ),
        "tokenizer.ggml.token_type": np.array(
            [2, 3, 3] + [6] * 256 + [1] * len(SPM_WORDS), np.int32
        ),
        "tokenizer.ggml.bos_token_id": np.uint32(1),
        "tokenizer.ggml.eos_token_id": np.uint32(2),
        "tokenizer.ggml.unknown_token_id": np.uint32(0),
    }


@pytest.fixture(scope="module")
def spm_gguf(gguf_path, tmp_path_factory) -> Path:
    """The SmolLM file's llama.* hyperparameters (llama.cpp reads them even for a vocabulary)
    with the SentencePiece vocabulary above, no tensors."""
    out = tmp_path_factory.mktemp("spm") / "spm.gguf"
    with fg.open(gguf_path) as f, fg.GGUFWriter(out, "llama") as w:
        for key, val in f.metadata.items():
            if key.startswith("llama."):
                w.add_key_value(key, val, f.metadata_types[key])
        for key, val in spm_metadata().items():
            w.add_key_value(key, val, "string" if isinstance(val, str) else None)
    return out


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.sampled_from(list("abcheloé \n<>s/")), max_size=24))
def test_sentencepiece_matches_llama_cpp_and_round_trips(spm_gguf, text):
    tok = GGUFTokenizer.from_gguf(spm_gguf)
    ids = tok.encode(text)
    assert ids == llama_tokenize(spm_gguf, text, add_bos=True)
    assert ids[0] == 1  # llama vocabularies add BOS unless the file says not to
    if "<s>" not in text and "</s>" not in text:  # a control token starts a new "▁" prefix
        assert tok.decode(ids) == text


# -- errors name the field ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": np.ones(3, np.int32)}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores"),
    ],
)
def test_bad_metadata_names_the_field(change, field):
    md = {k: v for k, v in {**spm_metadata(), **change}.items() if v is not None}
    with pytest.raises(fq.FormatError, match=re.escape(field)):
        GGUFTokenizer(md)


def test_unknown_pre_tokenizer_and_bad_merges_name_the_field():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
          "tokenizer.ggml.merges": ["a b"]}  # fmt: skip
    assert GGUFTokenizer({**md, "tokenizer.ggml.pre": "llama3"}).encode("ab") == [2]
    with pytest.raises(fq.FormatError, match=r"tokenizer\.ggml\.pre = 'new-model'"):
        GGUFTokenizer({**md, "tokenizer.ggml.pre": "new-model"})
    with pytest.raises(fq.FormatError, match=r"tokenizer\.ggml\.merges\[0\]"):
        GGUFTokenizer({**md, "tokenizer.ggml.merges": ["ab"]})
    with pytest.raises(fq.FormatError, match="tokenizer.chat_template"):
        GGUFTokenizer(md).render_chat([{"role": "user", "content": "hi"}])


# -- the command -------------------------------------------------------------------------------


def test_cli_generate_imports_no_torch_transformers_or_gguf_py(gguf_path):
    """`ferroquant generate --chat` end to end in a fresh interpreter: the text comes out and
    none of torch, transformers, gguf-py was imported."""
    script = textwrap.dedent(
        """
        import sys
        from ferroquant import cli
        rc = cli.main(["generate", sys.argv[1], "--prompt", "What is 2 + 2?", "--chat",
                       "--max-tokens", "8", "--threads", "1"])
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "gguf")]
        print("RC", rc, "HEAVY", heavy)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(gguf_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "RC 0 HEAVY []" in r.stdout, r.stdout + r.stderr
    assert "4" in r.stdout  # greedy: "The answer is 4."


def test_bos_and_eos_follow_the_file():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
          "tokenizer.ggml.tokens": ["a", "b", "ab", "<|e|>"], "tokenizer.ggml.merges": ["a b"],
          "tokenizer.ggml.token_type": [1, 1, 1, 3], "tokenizer.ggml.bos_token_id": 3,
          "tokenizer.ggml.eos_token_id": 3}  # fmt: skip
    assert GGUFTokenizer(md).encode("ab") == [2]  # gpt-2: no BOS unless the file says so
    tok = GGUFTokenizer({**md, "tokenizer.ggml.add_bos_token": True,
                         "tokenizer.ggml.add_eos_token": True})  # fmt: skip
    assert tok.encode("ab") == [3, 2, 3] and tok.encode("ab", add_special_tokens=False) == [2]
    assert tok.encode("a<|e|>b") == [3, 0, 3, 1, 3] and tok.decode([3, 0, 3, 1, 3]) == "ab"
    assert GGUFTokenizer(
        {**md, "tokenizer.ggml.pre": "llama3"}
    ).add_bos_token  # llama.cpp's default
